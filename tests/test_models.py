import pytest
import torch
import torch.nn as nn

from model import MODELS, NORMS
from model import summary as model_summary

EXPECTED_PARAMS = {"resnet18": 11_173_962, "custom_resnet": 6_575_370}
ALL = [(name, norm) for name in MODELS for norm in NORMS]


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,norm", ALL)
def test_exact_parameter_count(name, norm):
    assert n_params(MODELS[name](norm=norm)) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name,norm", ALL)
def test_forward_shape_and_finite(name, norm):
    torch.manual_seed(0)
    model = MODELS[name](norm=norm).eval()
    x = torch.randn(3, 3, 32, 32)
    before = x.clone()
    out = model(x)
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    assert torch.equal(x, before)  # the input is not modified in place


@pytest.mark.parametrize("name", list(MODELS))
def test_other_class_counts_and_sizes(name):
    model = MODELS[name](num_classes=3).eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("norm,groups", [("gn", 32), ("ln", 1)])
def test_group_counts(norm, groups):
    gns = [m for m in MODELS["resnet18"](norm=norm).modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 20  # stem + 16 in blocks + 3 shortcuts: every BN became a GroupNorm
    assert {m.num_groups for m in gns} == {groups}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in MODELS["resnet18"](norm=norm).modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_no_inplace_relu(name):
    """In-place ReLU breaks Grad-CAM's hooks on block outputs."""
    relus = [m for m in MODELS[name]().modules() if isinstance(m, nn.ReLU)]
    assert not any(m.inplace for m in relus)


def test_resnet18_kuangliu_layout():
    model = MODELS["resnet18"]()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    feats = {}
    model.layer4.register_forward_hook(lambda m, i, o: feats.update(layer4=o.shape))
    model.eval()(torch.randn(1, 3, 32, 32))
    assert feats["layer4"] == (1, 512, 4, 4)


@pytest.mark.parametrize("name", list(MODELS))
def test_summary_total_and_bn_untouched(name):
    model = MODELS[name]()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    table = model_summary(model)
    assert f"Total params: {EXPECTED_PARAMS[name]:,}" in table
    assert model.training  # mode restored
    for key, value in stats.items():
        assert torch.equal(model.state_dict()[key], value), key
