"""The captured training step is the eager step's mathematics.

On the CPU ``CapturedStep(graph=False)`` runs everything the CUDA graph path does but
the capture itself: static buffers, the undone warm-up, the fused SGD reading a device
lr, the eager odd last batch. The CUDA tests capture for real and run only on a GPU.
"""
import argparse

import pytest
import torch
import torch.nn as nn

from model import MODELS
from utils.device import choose_precision
from utils.dist import Dist
from utils.engine import NonFiniteLoss, train_one_epoch
from utils.errors import UserError
from utils.schedule import one_cycle
from utils.step import CapturedStep, Step, graph_refusal, make_step

CPU = torch.device("cpu")


def batches(device, sizes=(8, 8, 8, 5), seed=0):
    """Fixed batches; the last is smaller, as an epoch's last batch is."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device))
            for n in sizes]


def setup(device, precision, norm="bn", channels_last=False):
    torch.manual_seed(3)
    model = MODELS["custom_resnet"](num_classes=10, norm=norm).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = one_cycle(optimizer, 0.1, total_steps=8, peak_step=3)  # the lr changes every step
    return model, optimizer, scheduler, nn.CrossEntropyLoss(label_smoothing=0.2), precision.grad_scaler()


def train(device, precision, make, epochs=2, data=None, **kw):
    """(model, optimizer, per-epoch results, lrs) after ``epochs`` passes with the step ``make`` builds."""
    model, optimizer, scheduler, criterion, scaler = setup(device, precision, **kw)
    step = make(model, criterion, optimizer, scaler, precision)
    results, lrs = [], []
    for _ in range(epochs):
        results.append(train_one_epoch(model, data or batches(device), criterion, optimizer, scheduler, scaler,
                                        device, precision, lr_log=lrs, step=step))
    return model, optimizer, results, lrs, step


def assert_same_training(a, b, rtol, atol, steps=8):
    (model_a, opt_a, res_a, lrs_a, _), (model_b, opt_b, res_b, lrs_b, _) = a, b
    assert lrs_a == lrs_b and len(lrs_a) == steps
    for key, value in model_a.state_dict().items():  # weights and BatchNorm statistics
        torch.testing.assert_close(model_b.state_dict()[key].float(), value.float(), rtol=rtol, atol=atol,
                                   msg=lambda m, key=key: f"{key}: {m}")
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(opt_b.state[p_b]["momentum_buffer"], opt_a.state[p_a]["momentum_buffer"],
                                   rtol=rtol, atol=atol)
    for r_a, r_b in zip(res_a, res_b, strict=True):
        assert r_a["acc"] == r_b["acc"]
        assert r_a["loss"] == pytest.approx(r_b["loss"], rel=rtol, abs=atol)
    # the checkpoint keeps float learning rates: the device tensor is lent only while stepping
    assert isinstance(opt_b.param_groups[0]["lr"], float)


def test_the_captured_path_trains_as_the_eager_step_on_the_cpu():
    fp32 = choose_precision(CPU, "fp32")
    eager = train(CPU, fp32, Step)
    captured = train(CPU, fp32, lambda *a: CapturedStep(*a, graph=False))
    assert captured[4].name == "captured path, replayed eagerly"
    assert_same_training(eager, captured, rtol=1e-5, atol=1e-6)
    # the warm-up was undone: BatchNorm counted the 8 steps, not 8 + 3
    tracked = [int(m.num_batches_tracked) for m in captured[0].modules() if isinstance(m, nn.BatchNorm2d)]
    assert tracked and set(tracked) == {8}


def test_the_captured_path_continues_a_resumed_optimizer_as_the_eager_step():
    """Momentum buffers that exist before the capture are restored, not zeroed."""
    fp32 = choose_precision(CPU, "fp32")

    def resumed(make):
        model, optimizer, scheduler, criterion, scaler = setup(CPU, fp32)
        train_one_epoch(model, batches(CPU, seed=1), criterion, optimizer, scheduler, scaler, CPU, fp32)
        step = make(model, criterion, optimizer, scaler, fp32)
        lrs = []
        result = train_one_epoch(model, batches(CPU), criterion, optimizer, scheduler, scaler, CPU, fp32,
                                 lr_log=lrs, step=step)
        return model, optimizer, [result], lrs, step

    assert_same_training(resumed(Step), resumed(lambda *a: CapturedStep(*a, graph=False)), rtol=1e-5, atol=1e-6,
                         steps=4)


def test_a_replay_that_fails_its_check_leaves_the_run_on_the_eager_step(monkeypatch, capsys):
    fp32 = choose_precision(CPU, "fp32")
    eager = train(CPU, fp32, Step)
    monkeypatch.setattr(CapturedStep, "_replay", lambda self: None)  # a graph that does nothing
    captured = train(CPU, fp32, lambda *a: CapturedStep(*a, graph=False))
    assert captured[4].name == "eager (the CUDA graph failed its check)"
    assert capsys.readouterr().err == ("warning: one replay of the captured step moved the weights 100.0% away "
                                       "from an eager step: training runs eagerly; --no-cuda-graph skips the "
                                       "attempt\n")
    assert_same_training(eager, captured, rtol=1e-5, atol=1e-6)


def test_a_capture_that_raises_leaves_the_run_on_the_eager_step(monkeypatch, capsys):
    def fails(self, saved):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors ...")

    fp32 = choose_precision(CPU, "fp32")
    eager = train(CPU, fp32, Step)
    monkeypatch.setattr(CapturedStep, "_check", fails)
    captured = train(CPU, fp32, lambda *a: CapturedStep(*a, graph=False))
    assert capsys.readouterr().err.splitlines() == [
        "warning: the capture failed: operation not permitted when stream is capturing: training runs eagerly; "
        "--no-cuda-graph skips the attempt"]
    assert_same_training(eager, captured, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, 2], ids=["the batch the check runs on", "a later batch"])
def test_a_non_finite_loss_is_reported_at_its_step_by_the_captured_path(bad, capsys):
    fp32 = choose_precision(CPU, "fp32")
    model, optimizer, scheduler, criterion, scaler = setup(CPU, fp32)
    step = CapturedStep(model, criterion, optimizer, scaler, fp32, graph=False)
    data = batches(CPU)
    data[bad][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss) as info:
        train_one_epoch(model, data, criterion, optimizer, scheduler, scaler, CPU, fp32, step=step)
    assert info.value.step == bad + 1
    assert step.fallback is False and capsys.readouterr().err == ""  # not blamed on the capture


def args(**kw):
    base = {"cuda_graph": None, "compile": False, "optimizer": "sgd"}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw,ddp,dtype,why", [
    ({}, False, torch.bfloat16, ""),
    ({}, False, None, ""),
    ({}, True, torch.bfloat16, "under torchrun the gradients' all-reduce is not captured"),
    ({"compile": True}, False, torch.bfloat16, "--compile compiles the model instead: use one or the other"),
    ({"optimizer": "adam"}, False, torch.bfloat16, "only SGD is captured, not adam"),
    ({}, False, torch.float16, "fp16's loss scaling is left eager"),
])
def test_what_a_cuda_run_captures(kw, ddp, dtype, why):
    precision = type("P", (), {"dtype": dtype})()
    ddp = Dist(rank=0, world_size=2, local_rank=0) if ddp else Dist()
    assert graph_refusal(args(**kw), precision, torch.device("cuda"), ddp) == why


def test_the_cpu_steps_eagerly_and_refuses_an_explicit_cuda_graph():
    fp32 = choose_precision(CPU, "fp32")
    model, optimizer, _, criterion, scaler = setup(CPU, fp32)
    step = make_step(args(), model, criterion, optimizer, scaler, fp32, CPU, Dist())
    assert type(step) is Step and step.name == "eager"
    with pytest.raises(UserError, match=r"^--cuda-graph: it needs a CUDA GPU; drop the flag$"):
        make_step(args(cuda_graph=True), model, criterion, optimizer, scaler, fp32, CPU, Dist())


def test_main_says_which_step_it_runs(image_folder, tmp_path, capsys):
    from main import main
    argv = ["--model", "custom_resnet", "--data-dir", str(image_folder), "--out-dir", str(tmp_path / "run"),
            "--epochs", "1", "--batch-size", "16", "--workers", "0", "--gallery-size", "0", "--device", "cpu"]
    assert main(argv) == 0
    assert "| workers: 0 | step: eager\n" in capsys.readouterr().out
    assert main(argv + ["--cuda-graph", "--out-dir", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --cuda-graph: it needs a CUDA GPU; drop the flag"
    assert not (tmp_path / "run2").exists()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_the_cuda_graph_trains_as_the_eager_step(dtype, tol):
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    precision = choose_precision(device, dtype)
    data = batches(device)
    eager = train(device, precision, Step, data=data, channels_last=True)
    captured = train(device, precision, CapturedStep, data=data, channels_last=True)
    assert captured[4].graph is not None and captured[4].name == "CUDA graph"
    assert_same_training(eager, captured, rtol=tol, atol=tol)


@cuda
def test_main_on_cuda_captures_its_step_and_holds_the_data_on_the_gpu(image_folder, tmp_path, capsys):
    from main import main
    argv = ["--model", "custom_resnet", "--data-dir", str(image_folder), "--out-dir", str(tmp_path / "run"),
            "--epochs", "2", "--batch-size", "16", "--gallery-size", "0", "--device", "cuda"]
    assert main(argv) == 0
    first = capsys.readouterr().out.split("device: cuda")[1].splitlines()[0]
    assert "| gpu-aug (on the device) | step: CUDA graph" in first


def test_a_resumed_run_decides_its_cuda_graph_afresh():
    """A GPU run's saved --cuda-graph must not stop its resumption on a CPU."""
    from utils.checkpoint import resume_args
    resumed = args(cuda_graph=None)
    resume_args({"args": {"cuda_graph": True, "optimizer": "sgd"}}, resumed, set(), {}, "last.pt")
    assert resumed.cuda_graph is None
