"""The training step: forward, backward, the optimizer's step and the running sums, all on the device.

``Step`` runs it eagerly, as every device can. ``CapturedStep`` records it once in a
CUDA graph and replays it for every batch of that shape: one launch instead of a few
hundred kernel launches (the optimizer and the loss/accuracy sums included), so the
GPU stops waiting on Python. What the host changes between steps reaches the graph
through tensors the graph reads: the batch is copied into static input buffers and
the scheduler's learning rate into a device tensor that a fused SGD reads. A batch of
another shape (an epoch's smaller last batch) runs eagerly on the same model and
optimizer, so the mathematics is the eager step's (tests/test_step.py).
"""
import math
import sys
from contextlib import contextmanager, nullcontext

import torch

from .errors import UserError


class Step:
    """One optimizer step per call; loss and accuracy sums stay on the device until read."""

    def __init__(self, model, criterion, optimizer, scaler, precision):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.scaler, self.precision = scaler, precision
        device = next(model.parameters()).device
        self.loss_sum = torch.zeros((), device=device)  # sum of batch-mean losses x batch sizes
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.count = torch.zeros((), device=device, dtype=torch.long)  # steps since reset()
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)  # first non-finite loss
        self.name = "eager"

    def reset(self) -> None:
        """Zero the sums in place (a captured graph keeps reading the same tensors)."""
        for t in (self.loss_sum, self.correct, self.count):
            t.zero_()
        self.first_bad.fill_(-1)

    def __call__(self, images, labels) -> None:
        self._run(images, labels)

    def _run(self, images, labels, cache=True, set_to_none=True) -> None:
        with self.precision.autocast(cache):
            logits = self.model(images)
            loss = self.criterion(logits, labels)
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss = loss.detach()
        self.count += 1
        self.loss_sum += loss * labels.size(0)
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.first_bad.copy_(torch.where(~torch.isfinite(loss) & (self.first_bad < 0), self.count, self.first_bad))


class CapturedStep(Step):
    """``Step`` replayed from a CUDA graph; ``graph=False`` runs the same path without one (tests on the CPU).

    Before capture, ``WARMUP`` eager steps on a side stream let cuDNN pick its kernels and
    the optimizer make its state (torch's recipe); their effect on the weights, the
    BatchNorm statistics and the optimizer state is then undone, so the first replay is
    the run's first step. One replay is then checked against one eager step on the same
    batch (both undone): a capture that fails or moves the weights differently leaves the
    run on the eager step, with a warning, instead of training it wrongly.
    """

    WARMUP = 3
    TOLERANCE = 0.01  # relative difference of the weight updates allowed (kernels may differ in rounding)

    def __init__(self, model, criterion, optimizer, scaler, precision, graph=True):
        super().__init__(model, criterion, optimizer, scaler, precision)
        for group in optimizer.param_groups:  # fused SGD reads a tensor lr on the device
            group["fused"], group["foreach"] = True, False
        device = self.loss_sum.device
        self.lrs = [torch.tensor(float(g["lr"]), device=device) for g in optimizer.param_groups]
        self.graph, self.use_graph, self.static, self.fallback = None, graph, None, False
        self.name = "CUDA graph" if graph else "captured path, replayed eagerly"

    def __call__(self, images, labels) -> None:
        if self.fallback:
            return self._run(images, labels)
        for lr, group in zip(self.lrs, self.optimizer.param_groups, strict=True):
            lr.fill_(group["lr"])  # the scheduler's rate for this step; a launch, no host wait
        if self.static is None:
            self._prepare(images, labels)
            if self.fallback:
                return self._run(images, labels)
        if images.shape != self.static[0].shape or labels.shape != self.static[1].shape:
            with self._device_lr():  # the odd batch: eagerly, into the gradients the graph owns
                self._run(images, labels, set_to_none=False)
            return
        self.static[0].copy_(images, non_blocking=True)
        self.static[1].copy_(labels, non_blocking=True)
        self._replay()

    def _replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()

    def _body(self) -> None:
        with self._device_lr():
            self._run(*self.static, cache=False)  # autocast's weight cache is not allowed in a capture

    @contextmanager
    def _device_lr(self):
        """The optimizer reads the lr tensors while it steps; the groups keep floats otherwise."""
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for group, lr in zip(groups, self.lrs, strict=True):
            group["lr"] = lr
        try:
            yield
        finally:
            for group, lr in zip(groups, floats, strict=True):
                group["lr"] = lr

    def _prepare(self, images, labels) -> None:
        """Static buffers, the warm-up (undone), the capture and its check; on a problem, eager."""
        self.static = (torch.empty_like(images).copy_(images), torch.empty_like(labels).copy_(labels))
        saved = self._snapshot()
        cuda = self.use_graph and images.device.type == "cuda"
        side = torch.cuda.Stream(images.device) if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side) if cuda else nullcontext():
            for _ in range(self.WARMUP):
                self._body()
        if cuda:
            torch.cuda.current_stream(images.device).wait_stream(side)
        self._restore(saved)
        try:
            if cuda:
                self.graph = torch.cuda.CUDAGraph()
                # thread_local: the DataLoader's pin-memory thread may call CUDA during the capture
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self._body()
            problem = self._check(saved)
        except RuntimeError as exc:  # an op that cannot be captured
            problem = f"the capture failed: {str(exc).splitlines()[0]}"
        if problem:
            self._restore(saved)
            self.graph, self.fallback, self.name = None, True, "eager (the CUDA graph failed its check)"
            print(f"warning: {problem}: training runs eagerly; --no-cuda-graph skips the attempt",
                  file=sys.stderr)

    def _check(self, saved) -> str:
        """'' when one replay moves the weights as one eager step on the same batch does; else what
        differs. Both are undone afterwards. One host wait, once per run."""
        moves = []
        for run in (self._body, self._replay):
            run()
            moves.append([p.detach() - saved[0][name] for name, p in self.model.named_parameters()])
            self._restore(saved)
        eager, replayed = moves
        diff = torch.stack([(r - e).float().norm() for r, e in zip(replayed, eager, strict=True)]).norm()
        size = torch.stack([e.float().norm() for e in eager]).norm()
        rel = (diff / size.clamp(min=1e-12)).item()
        if rel <= self.TOLERANCE or not math.isfinite(rel):  # a non-finite loss: the run's own check says so
            return ""
        return f"one replay of the captured step moved the weights {rel:.1%} away from an eager step"

    def _snapshot(self) -> tuple:
        model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optim = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                 for p, s in self.optimizer.state.items()}
        return model, optim

    @torch.no_grad()
    def _restore(self, saved) -> None:
        """Weights, buffers and optimizer state back in place; state the warm-up created is zeroed,
        which is what a first step finds (a zero momentum buffer gives SGD's first-step ``buf = grad``)."""
        model, optim = saved
        for name, tensor in self.model.state_dict().items():
            tensor.copy_(model[name])
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.copy_(optim[param][key]) if key in optim.get(param, {}) else value.zero_()
        self.reset()


def graph_refusal(args, precision, device, ddp) -> str:
    """Why this run cannot capture its step ('' when it can)."""
    if device.type != "cuda":
        return "it needs a CUDA GPU"
    if ddp.enabled:
        return "under torchrun the gradients' all-reduce is not captured"
    if args.compile:
        return "--compile compiles the model instead: use one or the other"
    if args.optimizer != "sgd":
        return f"only SGD is captured, not {args.optimizer}"
    if precision.dtype == torch.float16:
        return "fp16's loss scaling is left eager"
    return ""


def make_step(args, model, criterion, optimizer, scaler, precision, device, ddp) -> Step:
    """The captured step where ``--cuda-graph`` (default: on where it can run) allows it, else the eager one."""
    why = graph_refusal(args, precision, device, ddp)
    if args.cuda_graph and why:
        raise UserError(f"--cuda-graph: {why}; drop the flag")
    if args.cuda_graph is False or why:
        step = Step(model, criterion, optimizer, scaler, precision)
        if args.cuda_graph is None and device.type == "cuda":
            step.name = f"eager ({why})"
        return step
    return CapturedStep(model, criterion, optimizer, scaler, precision)
