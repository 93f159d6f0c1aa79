"""The CPU bf16 convolution workarounds: same state_dict, same results within bf16 rounding, only where meant."""
import copy

import pytest
import torch
import torch.nn as nn

import utils.cpu_conv as cpu_conv
from model import MODELS
from utils.cpu_conv import CpuConv2d, use_cpu_convs


def test_every_conv_may_take_the_gemm_only_square_ones_fp32_grads_and_the_state_dict_is_unchanged():
    model = MODELS["custom_resnet"]()
    keys = list(model.state_dict())
    assert use_cpu_convs(model, fp32_weight_grads=True) == {"small_map_gemm": 8, "fp32_weight_grads": 4}
    fp32 = [n for n, m in model.named_modules() if isinstance(m, CpuConv2d) and m.fp32_weight_grads]
    assert fp32 == ["layer1.res.conv1.0", "layer1.res.conv2.0", "layer3.res.conv1.0", "layer3.res.conv2.0"]
    assert list(model.state_dict()) == keys
    # 20 convolutions; every 3x3 but the 3 that widen is square
    assert use_cpu_convs(MODELS["resnet18"](), fp32_weight_grads=True) == {"small_map_gemm": 20,
                                                                          "fp32_weight_grads": 13}
    assert use_cpu_convs(MODELS["resnet18"](), small_map_gemm=False) == {"small_map_gemm": 0,
                                                                        "fp32_weight_grads": 0}


def _grads(conv, x, g):
    conv.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.backward(g.to(out.dtype))
    return out, x.grad, conv.weight.grad, conv.bias.grad


def _fp64_reference(conv, x, g):
    """Output and gradients in fp64 from the bf16-rounded input and weights: what bf16 math approximates."""
    x = x.to(torch.bfloat16).double().requires_grad_()
    w = conv.weight.detach().to(torch.bfloat16).double().requires_grad_()
    b = conv.bias.detach().to(torch.bfloat16).double().requires_grad_()
    out = nn.functional.conv2d(x, w, b, conv.stride, conv.padding)
    return (out, *torch.autograd.grad(out, (x, w, b), g.to(torch.bfloat16).double()))


def _err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_weight_gradients_match_the_plain_convolution(channels_last):
    torch.manual_seed(0)
    plain = nn.Conv2d(16, 16, 3, padding=1)
    fixed = copy.deepcopy(plain)
    use_cpu_convs(fixed, fp32_weight_grads=True)
    x = torch.randn(4, 16, 8, 8)  # 8x8 output: too large for the GEMM
    g = torch.linspace(-1, 1, x.numel()).view_as(x)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        plain, fixed = (m.to(memory_format=torch.channels_last) for m in (plain, fixed))
    out_p, gx_p, gw_p, gb_p = _grads(plain, x, g)
    out_f, gx_f, gw_f, gb_f = _grads(fixed, x, g)
    assert out_f.dtype == torch.bfloat16
    torch.testing.assert_close(out_f, out_p, rtol=0, atol=0)  # the same bf16 forward
    torch.testing.assert_close(gx_f, gx_p, rtol=0, atol=0)  # the same bf16 input gradient
    # weight and bias gradients against fp64: ours within bf16 input rounding
    _, _, gw_ref, gb_ref = _fp64_reference(plain, x, g)
    torch.testing.assert_close(gw_f.double(), gw_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb_f.double(), gb_ref, rtol=1e-4, atol=1e-4)
    assert (gw_p - gw_ref).abs().max() >= (gw_f - gw_ref).abs().max()  # bf16 weight grads are no better


@pytest.mark.parametrize("shape", [
    (32, 32, 3, 1, 1, 4),  # a residual convolution at 4x4 (ResNet-18 layer4)
    (16, 32, 3, 2, 1, 8),  # the strided one that enters layer4
    (16, 32, 1, 2, 0, 8),  # its 1x1 shortcut
    (8, 8, 3, 1, 1, 3),    # odd sizes
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gemm_matches_fp64_as_closely_as_onednn(shape, channels_last):
    c_in, c_out, k, stride, pad, size = shape
    torch.manual_seed(0)
    plain = nn.Conv2d(c_in, c_out, k, stride, pad)
    gemm = copy.deepcopy(plain)
    use_cpu_convs(gemm)
    x = torch.randn(6, c_in, size, size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn(plain(x).shape, generator=torch.Generator().manual_seed(1))
    out_p, *grads_p = _grads(plain, x, g)
    out_g, *grads_g = _grads(gemm, x, g)
    assert out_g.dtype == torch.bfloat16 and out_g.shape == out_p.shape
    assert [t.dtype for t in grads_g] == [torch.float32] * 3
    ref = _fp64_reference(plain, x, g)
    for ours, onednn, exact in zip([out_g, *grads_g], [out_p, *grads_p], ref, strict=True):
        # oneDNN rounds once; the GEMM's input gradient sums k*k bf16-rounded terms: within 2x its error
        assert _err(ours, exact) <= 2 * _err(onednn, exact) + 1e-6
        assert _err(ours, exact) < 4e-3  # bf16 has 8 bits of mantissa


def test_only_outputs_of_at_most_4x4_take_the_gemm(monkeypatch):
    calls = []
    apply = cpu_conv._BF16GemmConv.apply
    monkeypatch.setattr(cpu_conv._BF16GemmConv, "apply",
                        lambda x, w, *rest: calls.append(tuple(x.shape[1:]) + (w.shape[0],)) or apply(x, w, *rest))
    x = torch.randn(2, 3, 32, 32)
    for name, expected in (("resnet18", [(256, 8, 8, 512), (512, 4, 4, 512), (256, 8, 8, 512),
                                         (512, 4, 4, 512), (512, 4, 4, 512)]),
                           ("custom_resnet", [(512, 4, 4, 512), (512, 4, 4, 512)])):
        calls.clear()
        model = MODELS[name]()
        use_cpu_convs(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).sum().backward()
        assert calls == expected, name  # layer4 (conv1, conv2, shortcut, then block 2); the ResBlock at 4x4
        calls.clear()
        model(x)  # fp32, outside autocast: oneDNN's convolution
        assert calls == []


def test_outside_bf16_autocast_it_is_a_plain_convolution():
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 8, 3, padding=1)
    fixed = copy.deepcopy(plain)
    use_cpu_convs(fixed, fp32_weight_grads=True)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(fixed(x), plain(x), rtol=0, atol=0)
