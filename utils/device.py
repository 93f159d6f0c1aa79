"""Device, precision and memory format: chosen once here and passed down."""
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .errors import UserError


class SetupError(UserError):
    """A problem with the run's settings; the message names the fix."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SetupError("--device mps asked for, but MPS is not available: use --device cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 math (AVX512-BF16 or AMX).

    Without it bf16 is emulated and slower than fp32. These are private torch.cpu
    helpers (run here on 2.15; the same functions appear in older torch.cpu
    sources); if one is missing we fall back to fp32 rather than fail.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@dataclass
class Precision:
    dtype: torch.dtype | None  # autocast dtype, None for plain fp32
    device_type: str

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self):
        # Only fp16 needs loss scaling: bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def choose_precision(device: torch.device, amp: bool) -> Precision:
    """bf16 where the hardware does it natively, fp16 on older CUDA GPUs, else fp32."""
    dtype = None
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif amp and device.type == "cpu" and cpu_has_fast_bf16():
        dtype = torch.bfloat16
    return Precision(dtype, device.type)


def use_channels_last(device: torch.device, requested: bool, norm: str = "bn") -> bool:
    """channels_last feeds tensor cores on CUDA and oneDNN's fast kernels on the CPU.

    Except GroupNorm on the CPU: torch's CPU GroupNorm with 32 groups is slower in
    channels_last (docs/speed.md has the step rates), so that case stays NCHW.
    MPS stays NCHW.
    """
    if not requested or device.type not in ("cuda", "cpu"):
        return False
    return not (device.type == "cpu" and norm == "gn")


def configure_backends(device: torch.device, benchmark: bool = True, deterministic: bool = False) -> None:
    """cudnn.benchmark (pick the fastest convolution for our fixed 32x32 shapes) unless determinism is asked for.

    TF32 matmuls speed up whatever runs outside autocast on Ampere and newer GPUs.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark and not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
