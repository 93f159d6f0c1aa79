"""CIFAR-10 constants: the one place the loaders, galleries and Grad-CAM read them from."""

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

# Per-channel mean and std of the 50,000 training images, pixel values in [0, 1].
# The std is the per-pixel one; the often-copied (0.2023, 0.1994, 0.2010) is not
# (https://github.com/kuangliu/pytorch-cifar/issues/19).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

IMAGE_SIZE = 32


def denormalize(images, mean=MEAN, std=STD):
    """Undo ``Normalize(mean, std)``: (..., 3, H, W) tensor -> floats in [0, 1]."""
    import torch

    mean = torch.tensor(mean, device=images.device).view(3, 1, 1)
    std = torch.tensor(std, device=images.device).view(3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def to_uint8_image(image, mean=MEAN, std=STD):
    """A normalised (3, H, W) tensor -> the (H, W, 3) uint8 RGB image it came from (within rounding)."""
    return (denormalize(image.detach().cpu(), mean, std) * 255).round().byte().permute(1, 2, 0).numpy()
