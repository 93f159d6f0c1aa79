"""``--fp32-weight-grads``: square convolutions take their weight gradients in fp32 on a bf16 CPU.

Measured on this repository's CPU (2 cores of a Xeon with AMX, torch 2.15, oneDNN 3.13,
batch 128, channels_last): oneDNN's bf16 backward-weights kernel (``brgconv_bwd_w`` on
AMX) for a 3x3 convolution with as many output as input channels takes 30 ms for
128->128 at 16x16 when the process has both cores, but about 1.06 s when another
process competes for them, whatever the layer's size (64->64 at 32x32, 256->256 at
8x8 and 512->512 at 4x4 too; widening layers are not hit); the same gradient in fp32
goes from 70 to 180 ms. Those square layers are the residual convolutions of both
networks, so a bf16 step shared with other work (loader workers, a test suite, a
second run) slows to below the fp32 one. With this option those layers compute
their weight and bias gradients in fp32; the forward pass and the input gradient stay
bf16. With the cores to itself a step is as fast either way for custom_resnet and
about 9% slower for resnet18 (interleaved, median of 10 steps), so it is off by
default. Nothing changes on GPUs, in fp32 or without autograd.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class _BF16ConvFP32WeightGrad(torch.autograd.Function):
    """conv2d in bf16; backward: input gradient in bf16, weight and bias gradients in fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)
        ctx.conv = (list(stride), list(padding), list(dilation), groups, bias is not None)
        return F.conv2d(xb, wb, None if bias is None else bias.to(torch.bfloat16), stride, padding,
                        dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        bias_sizes = [wb.shape[0]] if has_bias else None

        def conv_backward(g, x, w, mask):
            return torch.ops.aten.convolution_backward(g, x, w, bias_sizes, stride, padding, dilation,
                                                       False, [0, 0], groups, mask)
        gx = conv_backward(grad.to(torch.bfloat16), xb, wb, [need_x, False, False])[0] if need_x else None
        gw = gb = None
        if need_w or (has_bias and need_b):
            _, gw, gb = conv_backward(grad.float(), xb.float(), wb.float(), [False, need_w, has_bias and need_b])
        return gx, gw, gb, None, None, None, None


class Conv2dFP32WeightGrad(nn.Conv2d):
    """An nn.Conv2d (same parameters, same state_dict) that takes the workaround under CPU bf16 autocast."""

    def _conv_forward(self, input, weight, bias):
        if (input.device.type == "cpu" and self.padding_mode == "zeros" and torch.is_grad_enabled()
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            return _BF16ConvFP32WeightGrad.apply(input, weight, bias, self.stride, self.padding,
                                                 self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def use_fp32_weight_grads(model: nn.Module) -> int:
    """Switch the square nn.Conv2d layers of ``model`` to Conv2dFP32WeightGrad; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d and module.in_channels == module.out_channels:
            module.__class__ = Conv2dFP32WeightGrad  # same attributes and parameters: only forward differs
            count += 1
    return count
