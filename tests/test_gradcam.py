"""CAMs: agreement with pytorch-grad-cam, a model whose answer is known, hooks, overlay."""
import copy
import hashlib
import itertools

import cv2
import numpy as np
import pytest
import pytorch_grad_cam
import torch
import torch.nn as nn
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import gradcam
from gradcam import CAMS, DEFAULT_LAYERS, METHODS, GradCAM, LayerError, overlay
from model import MODELS, NORMS
from utils.gradcam import ScoreCAM

REFERENCE = {"gradcam": pytorch_grad_cam.GradCAM, "gradcam++": pytorch_grad_cam.GradCAMPlusPlus,
             "hirescam": pytorch_grad_cam.HiResCAM, "xgradcam": pytorch_grad_cam.XGradCAM,
             "layercam": pytorch_grad_cam.LayerCAM, "eigencam": pytorch_grad_cam.EigenCAM,
             "scorecam": pytorch_grad_cam.ScoreCAM}
DEEPEST = {"resnet18": "layer4", "custom_resnet": "layer3"}  # 4x4 maps


def random_model(name, norm, seed=0):
    """Random weights, with BN running statistics moved off their initial 0 / 1."""
    torch.manual_seed(seed)
    model = MODELS[name](norm=norm)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


def reference_maps(model, layer, method, x, classes, batch_size=None):
    # The library puts the model in eval mode and zeroes .grad: a copy takes that. Its ScoreCAM
    # takes no gradients and gets the model itself, so a Remembered model's outputs are shared.
    ref_model = model if method == "scorecam" else copy.deepcopy(model)
    targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
    with REFERENCE[method](model=ref_model, target_layers=[gradcam.find_layer(ref_model, layer)]) as cam:
        if batch_size is not None:
            cam.batch_size = batch_size  # its ScoreCAM reads this attribute (default 16)
        return cam(input_tensor=x, targets=targets)


class Remembered(nn.Module):
    """``model`` that runs once per distinct input (bit for bit) and then returns the stored output.

    Score-CAM runs the model on every channel's masked copy of the image. Ours and the
    library's build the same masked inputs, so with the model wrapped those passes run once
    per layer instead of four times (two implementations x predicted and chosen class): same
    inputs, same outputs, so the comparison is unchanged. The unmasked ``fresh`` images always
    run, so that the CAMs' hooks see the layer's activations.
    """

    def __init__(self, model, fresh):
        super().__init__()
        self.model, self.fresh, self.outputs = model, fresh, {}

    def forward(self, x):
        if x.shape == self.fresh.shape and torch.equal(x, self.fresh):
            return self.model(x)
        key = (tuple(x.shape), hashlib.sha1(x.detach().cpu().numpy().tobytes()).digest())
        if key not in self.outputs:
            self.outputs[key] = self.model(x)
        return self.outputs[key]


@pytest.mark.parametrize("method", list(CAMS))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_pytorch_grad_cam(name, norm, method):
    model = random_model(name, norm)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    if method == "scorecam":  # a forward pass per channel (256 or 512) and image: one image
        x = x[:1]
    chosen = [3, 5, 7, 1][:len(x)]
    for layer in (DEFAULT_LAYERS[name], DEEPEST[name]):
        net = model
        if method == "scorecam":
            net, layer = Remembered(model, fresh=x), "model." + layer
        for classes in (None, chosen):  # predicted, then chosen
            with CAMS[method](net, layer) as cam:
                ours = cam(x, classes)
            theirs = reference_maps(net, layer, method, x, classes, getattr(cam, "batch_size", None))
            assert ours.shape == theirs.shape == (len(x), 32, 32) and ours.dtype == np.float32
            assert np.abs(ours - theirs).max() < 1e-4, (layer, classes)
            assert ours.min() == 0 and ours.max() == pytest.approx(1, abs=1e-6)
            if classes is None:
                assert cam.class_idx.tolist() == cam.logits.argmax(1).tolist() != chosen


def test_methods_differ():
    """No method is another under a new name: every pair of maps differs somewhere."""
    assert len(set(CAMS.values())) == len(CAMS) and tuple(CAMS) == METHODS
    model = random_model("resnet18", "bn")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # Score-CAM: 256 passes
    maps = {}
    for method, cam_class in CAMS.items():
        with cam_class(model, "layer3") as cam:
            maps[method] = cam(x)
    for a, b in itertools.combinations(METHODS, 2):
        assert np.abs(maps[a] - maps[b]).max() > 0.05, (a, b)


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


CORNERS = {0: (slice(0, 8), slice(24, 32)), 1: (slice(24, 32), slice(0, 8))}  # TwoRegions' squares


@pytest.mark.parametrize("method", [m for m in METHODS if m != "eigencam"])  # class-discriminative
def test_cam_peaks_where_the_evidence_is(method):
    model, x = TwoRegions(), two_objects()
    with CAMS[method](model, "features") as cam:
        predicted = cam(x)[0]
        assert cam.class_idx.tolist() == [0]
        green = cam(x, class_idx=1)[0]
    for heat, k in ((predicted, 0), (green, 1)):
        rows, cols = CORNERS[k]
        peak = np.unravel_index(heat.argmax(), heat.shape)
        assert rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop, (k, peak)
        inside = heat[rows, cols].mean()
        outside = (heat.sum() - heat[rows, cols].sum()) / (heat.size - 64)
        assert inside > 0.6 and outside < 0.1, (k, inside, outside)


def test_eigencam_is_class_agnostic():
    """EigenCAM maps the activations' main component, whatever the class: one map for both.

    Which object it shows depends on the component's sign, which SVD leaves arbitrary (the
    other sign shows the other square), so the test asks only that the peak is on an object.
    """
    model, x = TwoRegions(), two_objects()
    with CAMS["eigencam"](model, "features") as cam:
        red = cam(x, class_idx=0)[0]
        green = cam(x, class_idx=1)[0]
        assert cam.class_idx.tolist() == [1] and cam.logits.shape == (1, 2)
    assert np.array_equal(red, green)
    peak = np.unravel_index(red.argmax(), red.shape)
    assert any(rows.start <= peak[0] < rows.stop and cols.start <= peak[1] < cols.stop
               for rows, cols in CORNERS.values()), peak


def test_scorecam_batches_and_images():
    """Several images, masked inputs in batches of one and of two: the same maps as the library."""
    model = TwoRegions()
    x = torch.cat([two_objects(seed) for seed in range(3)])
    for batch_size in (1, 2):
        with ScoreCAM(model, "features", batch_size=batch_size) as cam:
            ours = cam(x, [0, 1, 1])
        theirs = reference_maps(model, "features", "scorecam", x, [0, 1, 1])
        assert np.abs(ours - theirs).max() < 1e-4, batch_size
    with pytest.raises(ValueError, match="batch_size"):
        ScoreCAM(model, "features", batch_size=0)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_leaves_model_input_and_grads_as_found(mode, method):
    model = random_model("custom_resnet", "bn")
    model.train(mode == "train")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = copy.deepcopy(model.state_dict())  # includes BN running statistics
    x = torch.randn(3, 3, 32, 32)
    x_before = x.clone()
    layer = "prep" if method == "scorecam" else "layer2"  # 64 channels: 64 passes per image
    with CAMS[method](model, layer) as cam:
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
