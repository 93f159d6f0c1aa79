"""--precision: what auto picks on each kind of device, what is refused, and what inference takes."""
import argparse

import pytest
import torch

import utils.device as device_mod
from utils.checkpoint import resume_args
from utils.device import SetupError, choose_precision, run_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("fast,dtype,why", [(True, torch.bfloat16, "auto: this CPU has native bf16"),
                                            (False, None, "auto: no fast mixed precision on this CPU")])
def test_auto_on_the_cpu_takes_bf16_only_where_it_is_native(monkeypatch, fast, dtype, why):
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: fast)
    p = choose_precision(CPU)
    assert (p.dtype, p.why) == (dtype, why)
    assert p.grad_scaler().is_enabled() is False


@pytest.mark.parametrize("native,dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_takes_fp16_on_gpus_without_native_bf16(monkeypatch, native, dtype):
    monkeypatch.setattr(device_mod, "cuda_has_native_bf16", lambda: native)
    assert choose_precision(CUDA).dtype == dtype


def test_bf16_is_refused_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(device_mod, "cuda_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(SetupError, match=r"^--precision bf16: Tesla T4 has no native bf16 .*use --precision "
                                         r"fp16 or auto$"):
        choose_precision(CUDA, "bf16")
    assert choose_precision(CUDA, "fp16").dtype == torch.float16


def test_forced_precisions_on_the_cpu(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: False)
    fp16 = choose_precision(CPU, "fp16")
    assert fp16.dtype == torch.float16 and fp16.name == "fp16 autocast + loss scaling"
    assert fp16.grad_scaler().is_enabled()
    with fp16.autocast():
        assert torch.nn.Linear(4, 2)(torch.randn(3, 4)).dtype == torch.float16
    bf16 = choose_precision(CPU, "bf16")
    assert bf16.dtype == torch.bfloat16 and "emulates bf16, slower than fp32" in bf16.why
    fp32 = choose_precision(CPU, "fp32")
    assert (fp32.dtype, fp32.name, fp32.why) == (None, "fp32", "asked for")
    with pytest.raises(SetupError, match="not one of auto, bf16, fp16, fp32"):
        choose_precision(CPU, "fp8")


@pytest.mark.parametrize("saved,expected", [({"precision": "fp32"}, "fp32"), ({"precision": "fp16"}, "auto"),
                                            ({"precision": "bf16"}, "auto"), ({"amp": False}, "fp32"),
                                            ({"amp": True}, "auto"), ({}, "auto")])
def test_inference_keeps_fp32_runs_in_fp32_and_gives_others_the_devices_mixed_precision(saved, expected):
    assert run_precision(saved) == expected


@pytest.mark.parametrize("saved,given,expected", [({"amp": False}, set(), "fp32"),
                                                  ({"amp": False}, {"precision"}, "bf16"),
                                                  ({"amp": True}, set(), "auto"),
                                                  ({"precision": "fp16"}, set(), "fp16")])
def test_resuming_a_run_saved_before_the_flag_keeps_its_precision(saved, given, expected):
    args = argparse.Namespace(precision="bf16" if given else "auto")
    resume_args({"args": saved}, args, given, {}, "last.pt")
    assert args.precision == expected
