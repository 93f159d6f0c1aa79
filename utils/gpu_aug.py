"""``--gpu-aug``: the data set held on the training device as uint8, augmented in batches.

The same augmentations as ``utils.data.train_transform`` (reflect-pad 4 and random
32x32 crop, horizontal flip, one 8x8 cutout hole filled with the mean, normalise),
drawn with the same distributions (tests/test_gpu_aug.py compares them), but done as
a few tensor ops on a whole batch on the device instead of per image in loader
workers. It is for when the CPU cannot feed the GPU (airbench keeps CIFAR-10 on the
GPU for the same reason: https://github.com/KellerJordan/cifar10-airbench), and on
a CPU-only machine it frees the cores the workers would take.
"""
import numpy as np
import torch
import torch.nn.functional as F

from .cifar import IMAGE_SIZE, MEAN, STD

PAD = 4
HOLE = 8


def _fill_uint8(device) -> torch.Tensor:
    # the same rounded mean colour as train_transform's CoarseDropout fill
    return torch.tensor([round(m * 255) for m in MEAN], dtype=torch.uint8, device=device).view(1, 3, 1, 1)


def augment(images: torch.Tensor, generator: torch.Generator, cutout_p: float = 0.5) -> torch.Tensor:
    """Pad-crop, flip and cutout a (B, 3, 32, 32) uint8 batch; returns uint8, same shape.

    Random numbers come from ``generator`` (on the CPU, so a seed gives the same batch on
    any device); crop offsets are uniform on 0..8 per axis, as Albumentations' RandomCrop
    on the 40x40 padded image, and the hole lies wholly inside the image, as its CoarseDropout.
    """
    b, device = images.shape[0], images.device
    draw = dict(generator=generator)
    oy, ox = (torch.randint(0, 2 * PAD + 1, (b,), **draw) for _ in range(2))
    flip = torch.rand(b, **draw) < 0.5
    hole = torch.rand(b, **draw) < cutout_p
    hy, hx = (torch.randint(0, IMAGE_SIZE - HOLE + 1, (b,), **draw) for _ in range(2))
    oy, ox, flip, hole, hy, hx = (t.to(device, non_blocking=True) for t in (oy, ox, flip, hole, hy, hx))

    # reflect padding is not implemented for uint8; the values are small integers, exact in fp16/fp32
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    padded = F.pad(images.to(dtype), (PAD,) * 4, mode="reflect").to(torch.uint8)
    ar = torch.arange(IMAGE_SIZE, device=device)
    side = IMAGE_SIZE + 2 * PAD
    cols = ox[:, None] + ar
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # flip = read the columns backwards
    flat = ((oy[:, None] + ar) * side)[:, :, None] + cols[:, None, :]  # (B, 32, 32) into the padded image
    out = padded.flatten(2).gather(2, flat.flatten(1)[:, None, :].expand(b, 3, -1)).view(b, 3, IMAGE_SIZE, IMAGE_SIZE)
    inside_y = (ar[None, :] >= hy[:, None]) & (ar[None, :] < hy[:, None] + HOLE)
    inside_x = (ar[None, :] >= hx[:, None]) & (ar[None, :] < hx[:, None] + HOLE)
    mask = (inside_y[:, :, None] & inside_x[:, None, :] & hole[:, None, None])[:, None]
    return torch.where(mask, _fill_uint8(device), out)


def to_chw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) array -> contiguous uint8 (N, 3, H, W) tensor on the CPU."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, ``(x / 255 - MEAN) / STD`` as Albumentations' Normalize."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


class DeviceLoader:
    """Batches of (normalised float images, labels), made on ``device`` from uint8 arrays held there.

    Iterates like a DataLoader (``len()``, ``for images, labels in loader``). ``train``
    shuffles and augments; ``set_epoch(seed, epoch)`` fixes both, so a resumed run repeats
    an uninterrupted one. ``rank``/``world_size`` give each DDP process its own slice of
    the same shuffle (as DistributedSampler: training shares are padded to equal length,
    test shares are not, so the test counts cover each image once).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, device,
                 train: bool, cutout_p: float = 0.5, rank: int = 0, world_size: int = 1):
        self.images = to_chw(images).to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.batch_size, self.device, self.train, self.cutout_p = batch_size, torch.device(device), train, cutout_p
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(0)

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.generator.manual_seed(seed * 10_000 + epoch)

    def _share(self) -> int:
        n = len(self.labels)
        if self.train:  # padded, as DistributedSampler: every process must take as many steps
            return -(-n // self.world_size)
        return len(range(self.rank, n, self.world_size))

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if not self.train:
            return torch.arange(n)[self.rank::self.world_size]
        order = torch.randperm(n, generator=self.generator)
        padded = order.repeat(-(-self._share() * self.world_size // n))[:self._share() * self.world_size]
        return padded[self.rank::self.world_size]

    def __len__(self):
        return -(-self._share() // self.batch_size)

    def __iter__(self):
        indices = self._indices()
        if self.train:  # each rank draws different augmentations from the shared shuffle
            aug = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=self.generator))
                                                + self.rank)
        for start in range(0, len(indices), self.batch_size):
            idx = indices[start:start + self.batch_size].to(self.device)
            images = self.images[idx]
            if self.train:
                images = augment(images, aug, self.cutout_p)
            yield normalize(images), self.labels[idx]
