"""Test-time flip: evaluate and predict average the logits of each image and its mirror image."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.device import Precision
from utils.engine import evaluate, predict

FP32 = Precision(None, "cpu")


class LeftBrighter(nn.Module):
    """Class 0 when the left half is brighter than the right, else class 1: not mirror-symmetric."""

    def forward(self, x):
        diff = x[..., :16].mean((1, 2, 3)) - x[..., 16:].mean((1, 2, 3))
        return torch.stack([diff, -diff], 1)


def left_right_batches(n=16):
    torch.manual_seed(0)
    images = torch.rand(n, 3, 32, 32)
    labels = torch.arange(n) % 2
    images[labels == 0, ..., :16] += 1  # left half brighter
    images[labels == 1, ..., 16:] += 1
    return [(images[:8], labels[:8]), (images[8:], labels[8:])]


def test_flip_is_horizontal_and_both_views_are_reported():
    loader = left_right_batches()
    plain = evaluate(LeftBrighter(), loader, torch.device("cpu"), FP32)
    flipped = evaluate(LeftBrighter(), loader, torch.device("cpu"), FP32, tta=True)
    assert plain["acc"] == plain["single_acc"] == 100.0
    assert flipped["single_acc"] == 100.0 and flipped["single_loss"] == plain["loss"]
    # the mirror image swaps left and right, so the averaged logits cancel to zero:
    # a vertical flip (or none) would leave them at 100%
    assert flipped["loss"] == torch.log(torch.tensor(2.0)).item()
    assert flipped["acc"] == 50.0  # argmax of a tie is class 0, right for half the images


def test_averaged_logits_match_a_hand_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    images, labels = torch.randn(10, 3, 32, 32), torch.randint(0, 4, (10,))
    loader = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    with torch.no_grad():
        logits = (model(images) + model(images.flip(3))) / 2
    got = evaluate(model, loader, torch.device("cpu"), FP32, tta=True)
    assert abs(got["loss"] - F.cross_entropy(logits, labels).item()) < 1e-5
    assert got["acc"] == 100.0 * (logits.argmax(1) == labels).float().mean().item()
    probs = predict(model, loader, torch.device("cpu"), FP32, tta=True)
    assert torch.allclose(probs, logits.softmax(1), atol=1e-6)
    assert 100.0 * (probs.argmax(1) == labels).float().mean().item() == got["acc"]
