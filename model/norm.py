"""The normalisation layers the models can be built with (``--norm``)."""
import torch.nn as nn

NORMS = ("bn", "gn", "ln")

# GroupNorm with 32 groups is the setting Wu & He found best on ImageNet
# (https://arxiv.org/abs/1803.08494, Table 3) and the one its paper recommends;
# every width here (64..512) divides by 32. min() keeps it valid for narrower layers.
GN_GROUPS = 32


def make_norm(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d, GroupNorm(32 groups) or LayerNorm over (C, H, W).

    LayerNorm over (C, H, W) is GroupNorm with a single group: it normalises
    each image over all its channels and positions and keeps a per-channel
    affine, so all three have 2 * channels parameters and the models have the
    same parameter count whichever is chosen.
    """
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(min(GN_GROUPS, channels), channels)
    if norm == "ln":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
