"""Two workarounds for oneDNN's bf16 convolutions on CPUs with AMX, chosen per module.

Both apply only on the CPU under bf16 autocast; on GPUs, in fp32 and outside autocast a
switched module is a plain ``nn.Conv2d`` (same parameters, same state_dict).

**Small maps as one matrix multiply** (``--small-map-gemm``, on by default). oneDNN's
AMX convolution kernels are slow when the output map is tiny (ResNet-18's layer4, the
custom ResNet's last ResBlock, at 4x4), so outputs of at most ``GEMM_MAX_PIXELS`` pixels
run as im2col (nine shifted slices of the padded NHWC input, concatenated) and one bf16
GEMM. The input gradient is summed back from the nine slices in fp32, the weight
gradient is one GEMM with fp32 accumulation.

**fp32 weight gradients of square convolutions** (``--fp32-weight-grads``, off by
default). oneDNN's bf16 backward-weights kernel for a convolution with as many output as
input channels slows by an order of magnitude when another process competes for the
cores; with this option those layers compute their weight and bias gradients in fp32,
the forward pass and the input gradient staying bf16. A square layer that takes the GEMM
above computes its weight gradient as an fp32 GEMM instead.

The timings behind both choices are in docs/speed.md ("The CPU convolution workarounds").
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

GEMM_MAX_PIXELS = 16  # output maps up to 4x4 go through the GEMM


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


def _out_size(size, kernel, stride, padding):
    """(Ho, Wo) of a convolution (dilation 1) over an input of (H, W)."""
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(size, kernel, stride, padding, strict=True))


def _windows(padded, kernel, stride, out_size):
    """The kernel's k*k shifted, strided views of a padded (N, H, W, C) tensor, each (N, Ho, Wo, C)."""
    (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out_size
    return [(i, j, padded[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw])
            for i in range(kh) for j in range(kw)]


class _BF16GemmConv(torch.autograd.Function):
    """conv2d (groups 1, dilation 1) as im2col and one bf16 GEMM, for maps where oneDNN is slow."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, fp32_weight_grad):
        n, c, h, w = x.shape
        o, _, kh, kw = weight.shape
        (ph, pw), (ho, wo) = padding, _out_size((h, w), (kh, kw), stride, padding)
        padded = F.pad(x.to(torch.bfloat16).permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # N, H+2p, W+2p, C
        cols = torch.cat([v for _, _, v in _windows(padded, (kh, kw), stride, (ho, wo))], dim=-1)
        cols = cols.reshape(n * ho * wo, kh * kw * c)
        wmat = weight.to(torch.bfloat16).permute(0, 2, 3, 1).reshape(o, kh * kw * c)  # matches cols' order
        out = cols @ wmat.t() if bias is None else torch.addmm(bias.to(torch.bfloat16), cols, wmat.t())
        ctx.save_for_backward(cols, wmat)
        ctx.geometry = (x.shape, x.dtype, weight.shape, (kh, kw), stride, (ph, pw), (ho, wo), bias is not None)
        ctx.fp32_weight_grad = fp32_weight_grad
        return out.view(n, ho, wo, o).permute(0, 3, 1, 2)  # NCHW shape, channels_last strides

    @staticmethod
    def backward(ctx, grad):
        cols, wmat = ctx.saved_tensors
        x_shape, x_dtype, w_shape, kernel, stride, (ph, pw), out_size, has_bias = ctx.geometry
        n, c, h, w = x_shape
        gmat = grad.to(torch.bfloat16).permute(0, 2, 3, 1).reshape(-1, w_shape[0])  # N*Ho*Wo, O
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gcols = (gmat @ wmat).view(n, *out_size, *kernel, c)
            padded = torch.zeros(n, h + 2 * ph, w + 2 * pw, c)  # fp32: the k*k windows overlap
            for i, j, view in _windows(padded, kernel, stride, out_size):
                view += gcols[:, :, :, i, j]
            gx = padded[:, ph:ph + h, pw:pw + w].to(x_dtype).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            gw = gmat.float().t() @ cols.float() if ctx.fp32_weight_grad else (gmat.t() @ cols).float()
            gw = gw.view(w_shape[0], *kernel, c).permute(0, 3, 1, 2)
        if has_bias and ctx.needs_input_grad[2]:
            gb = gmat.float().sum(0)
        return gx, gw, gb, None, None, None


def _cpu_bf16(x) -> bool:
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class CpuConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters, same state_dict) that takes the workarounds switched on for it."""

    small_map_gemm = False
    fp32_weight_grads = False

    def _gemm_fits(self, x) -> bool:
        if not (self.small_map_gemm and x.dim() == 4 and self.groups == 1 and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            return False
        ho, wo = _out_size(x.shape[-2:], self.kernel_size, self.stride, self.padding)
        return ho * wo <= GEMM_MAX_PIXELS

    def _conv_forward(self, input, weight, bias):
        if _cpu_bf16(input):
            if self._gemm_fits(input):
                return _BF16GemmConv.apply(input, weight, bias, self.stride, self.padding, self.fp32_weight_grads)
            if self.fp32_weight_grads and torch.is_grad_enabled() and self.padding_mode == "zeros":
                return _BF16ConvFP32WeightGrad.apply(input, weight, bias, self.stride, self.padding,
                                                     self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def use_cpu_convs(model: nn.Module, small_map_gemm: bool = True, fp32_weight_grads: bool = False) -> dict:
    """Switch ``model``'s nn.Conv2d layers to CpuConv2d; returns how many take each workaround.

    Every convolution may take the GEMM (whether it does depends on its output size at run
    time); only square ones (as many output as input channels) take the fp32 weight gradients.
    """
    counts = {"small_map_gemm": 0, "fp32_weight_grads": 0}
    for module in model.modules():
        if type(module) not in (nn.Conv2d, CpuConv2d):
            continue
        module.__class__ = CpuConv2d  # same attributes and parameters: only forward differs
        module.small_map_gemm = small_map_gemm
        module.fp32_weight_grads = fp32_weight_grads and module.in_channels == module.out_channels
        counts["small_map_gemm"] += module.small_map_gemm
        counts["fp32_weight_grads"] += module.fp32_weight_grads
    return counts
