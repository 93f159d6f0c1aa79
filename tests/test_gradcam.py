"""Grad-CAM: agreement with pytorch-grad-cam, a model whose answer is known, hooks, overlay."""
import copy

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from pytorch_grad_cam import GradCAM as RefGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as RefGradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import gradcam
from gradcam import CAMS, DEFAULT_LAYERS, GradCAM, GradCAMPlusPlus, LayerError, overlay
from model import MODELS, NORMS

REFERENCE = {"gradcam": RefGradCAM, "gradcam++": RefGradCAMPlusPlus}
DEEPEST = {"resnet18": "layer4", "custom_resnet": "layer3"}  # 4x4 maps


def random_model(name, norm, seed=0):
    """Random weights, with BN running statistics moved off their initial 0 / 1."""
    torch.manual_seed(seed)
    model = MODELS[name](norm=norm)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


def reference_maps(model, layer, method, x, classes):
    ref_model = copy.deepcopy(model)  # the library puts the model in eval mode and zeroes .grad
    targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
    with REFERENCE[method](model=ref_model, target_layers=[gradcam.find_layer(ref_model, layer)]) as cam:
        return cam(input_tensor=x, targets=targets)


@pytest.mark.parametrize("method", list(CAMS))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_pytorch_grad_cam(name, norm, method):
    model = random_model(name, norm)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for layer in (DEFAULT_LAYERS[name], DEEPEST[name]):
        for classes in (None, [1, 3, 5, 7]):  # predicted, then chosen
            with CAMS[method](model, layer) as cam:
                ours = cam(x, classes)
            theirs = reference_maps(model, layer, method, x, classes)
            assert ours.shape == theirs.shape == (4, 32, 32) and ours.dtype == np.float32
            assert np.abs(ours - theirs).max() < 1e-4, (layer, classes)
            assert ours.min() == 0 and ours.max() == pytest.approx(1, abs=1e-6)
            if classes is None:
                assert cam.class_idx.tolist() == cam.logits.argmax(1).tolist()


def test_methods_differ():
    """Grad-CAM++ is not Grad-CAM under another name."""
    model = random_model("resnet18", "bn")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with GradCAM(model, "layer3") as a, GradCAMPlusPlus(model, "layer3") as b:
        assert np.abs(a(x) - b(x)).max() > 0.05


class TwoRegions(nn.Module):
    """Class 0 = red in the top-right 8x8 corner, class 1 = green in the bottom-left one.

    ``features`` gives an 8x8 map (channel 0 red-ness, channel 1 green-ness), after a
    ReLU as in any CNN (Grad-CAM++'s weights assume activations >= 0); each logit sums
    its channel over its corner only, so its evidence lies there alone.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.ReLU(),
                                      nn.AvgPool2d(4))  # (B, 2, 8, 8)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([[1.0, -1, -1], [-1, 1, -1]]).view(2, 3, 1, 1))

    def forward(self, x):
        f = self.features(x)
        return torch.stack([f[:, 0, :2, 6:].sum((1, 2)), f[:, 1, 6:, :2].sum((1, 2))], 1)


def two_objects(seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(0, 0.1, (3, 32, 32)).astype(np.float32)
    img[0, :8, 24:] += 2.0  # red square, top right
    img[1, 24:, :8] += 1.0  # green square, bottom left, weaker: the red class wins
    return torch.from_numpy(img)[None]


@pytest.mark.parametrize("cam_class", [GradCAM, GradCAMPlusPlus])
def test_cam_peaks_where_the_evidence_is(cam_class):
    model, x = TwoRegions(), two_objects()
    corners = {0: (slice(0, 8), slice(24, 32)), 1: (slice(24, 32), slice(0, 8))}
    with cam_class(model, "features") as cam:
        predicted = cam(x)[0]
        assert cam.class_idx.tolist() == [0]
        green = cam(x, class_idx=1)[0]
    for heat, k in ((predicted, 0), (green, 1)):
        rows, cols = corners[k]
        peak = np.unravel_index(heat.argmax(), heat.shape)
        assert rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop, (k, peak)
        inside = heat[rows, cols].mean()
        outside = (heat.sum() - heat[rows, cols].sum()) / (heat.size - 64)
        assert inside > 0.6 and outside < 0.1, (k, inside, outside)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_leaves_model_input_and_grads_as_found(mode):
    model = random_model("custom_resnet", "bn")
    model.train(mode == "train")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = copy.deepcopy(model.state_dict())  # includes BN running statistics
    x = torch.randn(3, 3, 32, 32)
    x_before = x.clone()
    with GradCAM(model, "layer2") as cam:
        assert hook_count(model) == 1
        with torch.no_grad():  # works inside the caller's no_grad too
            maps = cam(x)
    assert maps.shape == (3, 32, 32)
    assert model.training == (mode == "train")
    assert torch.equal(x, x_before) and not x.requires_grad
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert hook_count(model) == 0


def test_hooks_removed_when_the_body_raises():
    model = random_model("resnet18", "bn")
    with pytest.raises(KeyError):  # not swallowed, unlike pytorch-grad-cam's IndexError
        with GradCAM(model, "layer3") as cam:
            cam(torch.randn(1, 3, 32, 32))
            raise KeyError("the body failed")
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="inside `with"):
        cam(torch.randn(1, 3, 32, 32))


def test_frozen_weights_and_batch_of_one():
    model = random_model("resnet18", "gn")
    for p in model.parameters():
        p.requires_grad_(False)
    with GradCAM(model, "layer4.1.conv2") as cam:
        maps = cam(torch.randn(3, 32, 32), class_idx=2)  # one (C, H, W) image
    assert maps.shape == (1, 32, 32) and np.isfinite(maps).all() and maps.max() > 0.99
    assert all(p.grad is None for p in model.parameters())


def test_class_idx_checked():
    model = random_model("custom_resnet", "bn")
    with GradCAM(model, "layer2") as cam:
        with pytest.raises(ValueError, match="one per image"):
            cam(torch.randn(2, 3, 32, 32), [1, 2, 3])
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            cam(torch.randn(2, 3, 32, 32), [1, 10])


def test_unknown_layer_lists_valid_ones():
    model = MODELS["resnet18"]()
    with pytest.raises(LayerError) as err:
        GradCAM(model, "layer5")
    message = str(err.value)
    assert "'layer5'" in message and "did you mean layer" in message
    assert "conv1, bn1, layer1, layer2, layer3, layer4, linear" in message and "\n" not in message
    with pytest.raises(LayerError, match="did you mean layer4.1.conv2"):
        gradcam.find_layer(model, "layer4.1.conv3")


def test_check_layer_shapes():
    assert gradcam.check_layer(MODELS["resnet18"](), "layer3") == (256, 8, 8)
    assert gradcam.check_layer(MODELS["custom_resnet"](), "layer2") == (256, 8, 8)
    assert gradcam.check_layer(MODELS["custom_resnet"](), "layer1.res.conv2") == (128, 16, 16)
    with pytest.raises(LayerError, match="not a spatial"):
        gradcam.check_layer(MODELS["resnet18"](), "linear")
    with pytest.raises(LayerError, match="not a spatial"):
        gradcam.check_layer(MODELS["custom_resnet"](), "pool")  # 1x1


def test_default_layers_cover_every_model():
    assert set(DEFAULT_LAYERS) == set(MODELS)


def test_overlay():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    heat = rng.random((32, 32)).astype(np.float32)
    assert np.array_equal(overlay(image, heat, alpha=0.0), image)
    assert np.array_equal(overlay(image / 255.0, heat, alpha=0.0), image)  # floats in [0, 1] too
    ends = overlay(np.zeros((1, 2, 3), np.uint8), np.array([[0.0, 1.0]]), alpha=1.0)
    assert ends.tolist() == [[[0, 0, 128], [128, 0, 0]]]  # jet: dark blue = cold, dark red = hot
    half = overlay(image, heat, alpha=0.5).astype(int)
    jet = cv2.applyColorMap(np.uint8(np.round(255 * heat)), cv2.COLORMAP_JET)[..., ::-1].astype(int)
    assert np.abs(half - (image.astype(int) + jet) / 2).max() <= 0.5
    with pytest.raises(ValueError, match="size"):
        overlay(image, heat[:16])
