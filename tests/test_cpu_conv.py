"""The CPU bf16 workaround: same forward, same input gradient, weight gradients as precise, same state_dict."""
import copy

import pytest
import torch
import torch.nn as nn

from model import MODELS
from utils.cpu_conv import Conv2dFP32WeightGrad, use_fp32_weight_grads


def test_only_square_convolutions_are_switched_and_the_state_dict_is_unchanged():
    model = MODELS["custom_resnet"]()
    keys = list(model.state_dict())
    assert use_fp32_weight_grads(model) == 4  # the two ResBlocks' two convolutions each
    switched = [n for n, m in model.named_modules() if isinstance(m, Conv2dFP32WeightGrad)]
    assert switched == ["layer1.res.conv1.0", "layer1.res.conv2.0", "layer3.res.conv1.0", "layer3.res.conv2.0"]
    assert list(model.state_dict()) == keys
    assert use_fp32_weight_grads(MODELS["resnet18"]()) == 13  # every 3x3 conv but the 3 that widen


def _grads(conv, x):
    conv.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, x.grad, conv.weight.grad, conv.bias.grad


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_match_the_plain_convolution(channels_last):
    torch.manual_seed(0)
    plain = nn.Conv2d(16, 16, 3, padding=1)
    fixed = copy.deepcopy(plain)
    use_fp32_weight_grads(fixed)
    x = torch.randn(4, 16, 8, 8)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        plain, fixed = (m.to(memory_format=torch.channels_last) for m in (plain, fixed))
    out_p, gx_p, gw_p, gb_p = _grads(plain, x)
    out_f, gx_f, gw_f, gb_f = _grads(fixed, x)
    assert out_f.dtype == torch.bfloat16
    torch.testing.assert_close(out_f, out_p, rtol=0, atol=0)  # the same bf16 forward
    torch.testing.assert_close(gx_f, gx_p, rtol=0, atol=0)  # the same bf16 input gradient
    # weight and bias gradients against an fp32 reference: ours within bf16 input rounding
    ref = copy.deepcopy(plain).float()
    ref.zero_grad()
    xr = x.to(torch.bfloat16).float()
    w = ref.weight.detach().to(torch.bfloat16).float().requires_grad_()
    b = ref.bias.detach().to(torch.bfloat16).float().requires_grad_()
    out = nn.functional.conv2d(xr, w, b, padding=1)
    g = torch.linspace(-1, 1, out.numel()).view_as(out).to(torch.bfloat16).float()
    gw_ref, gb_ref = torch.autograd.grad(out, (w, b), g)
    torch.testing.assert_close(gw_f, gw_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb_f, gb_ref, rtol=1e-4, atol=1e-4)
    assert (gw_p - gw_ref).abs().max() >= (gw_f - gw_ref).abs().max()  # bf16 weight grads are no better


def test_outside_bf16_autocast_it_is_a_plain_convolution():
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 8, 3, padding=1)
    fixed = copy.deepcopy(plain)
    use_fp32_weight_grads(fixed)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(fixed(x), plain(x), rtol=0, atol=0)
