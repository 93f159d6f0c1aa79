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


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class Precision:
    dtype: torch.dtype | None  # autocast dtype, None for plain fp32
    device_type: str
    why: str = ""  # how it was chosen, printed beside the name

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16 autocast",
                torch.float16: "fp16 autocast + loss scaling"}[self.dtype]

    def autocast(self, cache: bool = True):
        """Autocast to ``dtype``; ``cache=False`` inside a CUDA graph capture (torch's rule)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=cache)

    def grad_scaler(self):
        # Only fp16 needs loss scaling: bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def cuda_has_native_bf16() -> bool:
    """Ampere and newer; T4 and V100 only emulate bf16 (slower than fp16)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation argument
        return torch.cuda.is_bf16_supported()


def choose_precision(device: torch.device, requested: str = "auto") -> Precision:
    """``--precision``: auto takes bf16 where the hardware does it natively, fp16 on older CUDA
    GPUs, else fp32; bf16, fp16 and fp32 are taken as asked, bf16 on a GPU without it refused."""
    if requested not in PRECISIONS:
        raise SetupError(f"--precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        if requested == "bf16" and device.type == "cuda" and not cuda_has_native_bf16():
            raise SetupError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bf16 "
                             "(Ampere or newer has): use --precision fp16 or auto")
        why = "asked for"
        if requested == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
            why = "asked for; this CPU emulates bf16, slower than fp32"
        return Precision(_DTYPES[requested], device.type, why)
    if device.type == "cuda":
        native = cuda_has_native_bf16()
        return Precision(torch.bfloat16 if native else torch.float16, device.type,
                         "auto: " + ("native bf16 on this GPU" if native else "this GPU has no native bf16"))
    if device.type == "cpu" and cpu_has_fast_bf16():
        return Precision(torch.bfloat16, device.type, "auto: this CPU has native bf16")
    return Precision(None, device.type, f"auto: no fast mixed precision on this {device.type.upper()}")


def run_precision(args: dict) -> str:
    """The --precision a saved run asks of inference: fp32 if it trained in fp32, else auto
    (the fast mixed precision of the device at hand). Runs saved before --precision had --amp."""
    if args.get("precision", "fp32" if args.get("amp", True) is False else "auto") == "fp32":
        return "fp32"
    return "auto"


def use_channels_last(device: torch.device, requested: bool, norm: str = "bn") -> bool:
    """channels_last feeds tensor cores on CUDA and oneDNN's fast kernels on the CPU.

    Except GroupNorm on the CPU: torch's CPU GroupNorm with 32 groups is slower in
    channels_last (docs/speed.md has the step rates), so that case stays NCHW.
    MPS stays NCHW.
    """
    if not requested or device.type not in ("cuda", "cpu"):
        return False
    return not (device.type == "cpu" and norm == "gn")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read afterwards is real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configure_backends(device: torch.device, benchmark: bool = True, deterministic: bool = False) -> None:
    """cudnn.benchmark (pick the fastest convolution for our fixed 32x32 shapes) unless determinism is asked for.

    TF32 matmuls speed up whatever runs outside autocast on Ampere and newer GPUs.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark and not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
