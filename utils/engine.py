"""One function per phase: ``train_one_epoch`` and ``evaluate`` print nothing and return dicts of floats."""
import time

import torch
import torch.nn.functional as F

from .dist import all_reduce_max, all_reduce_sum
from .errors import UserError
from .signals import check as check_sigterm
from .step import Step


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite; ``step`` is the first such step of the epoch."""

    def __init__(self, step: int):
        super().__init__(f"the training loss became non-finite at step {step}")
        self.step = step


def _to_device(images, labels, device, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device, precision,
                    channels_last=False, log=None, log_interval=20, lr_log=None, step=None) -> dict:
    """One pass over ``loader``; the scheduler steps every batch.

    ``step`` (utils/step.py; default an eager ``Step`` of the model, criterion,
    optimizer and scaler) does each batch's work and keeps the loss and correct
    counts on the device. ``log(running)`` is called every ``log_interval``
    batches with the running loss and accuracy (of this process), and that is
    the only place the loop waits for the device; there too a non-finite loss
    since the last check raises ``NonFiniteLoss`` naming its step, so a diverged
    run stops within ``log_interval`` steps. The returned loss and accuracy are
    over all processes under torchrun. ``lr_log``, a list, gets the lr each
    batch used, read from the optimizer.
    """
    model.train()
    step = step or Step(model, criterion, optimizer, scaler, precision)
    step.reset()
    seen, lr = 0, optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    for i, (images, labels) in enumerate(loader, 1):
        check_sigterm()  # between batches: a SIGTERM stops the run here (utils/signals.py)
        images, labels = _to_device(images, labels, device, channels_last)
        lr = optimizer.param_groups[0]["lr"]  # the rate this batch uses
        step(images, labels)
        if lr_log is not None:
            lr_log.append(lr)
        scheduler.step()
        seen += labels.size(0)
        if i % log_interval == 0 or i == len(loader):
            # .item() is a host-device sync point; once per log interval only. The max over
            # the processes makes every process stop at the same check under torchrun.
            first_bad = all_reduce_max(step.first_bad.clone()).item()
            if first_bad >= 0:
                raise NonFiniteLoss(first_bad)
            if log is not None:
                log({"loss": step.loss_sum.item() / seen, "acc": 100.0 * step.correct.item() / seen, "lr": lr})
    # summed over the processes under torchrun; .tolist() waits for the device, so the time is real
    loss, correct, seen = all_reduce_sum(torch.stack([step.loss_sum, step.correct.to(step.loss_sum.dtype),
                                                      torch.tensor(float(seen), device=device)])).tolist()
    seconds = time.perf_counter() - start
    return {"loss": loss / max(seen, 1), "acc": 100.0 * correct / max(seen, 1),
            "lr": lr, "seconds": seconds, "images_per_s": seen / seconds}


def _views(model, images, tta):
    """Logits of the images and, with ``tta``, of their mirror images (None without)."""
    logits = model(images)
    return logits, (model(images.flip(-1)) if tta else None)


@torch.no_grad()
def evaluate(model, loader, device, precision, channels_last=False, tta=False) -> dict:
    """Mean cross-entropy (no label smoothing) and accuracy in percent.

    With ``tta`` the logits of each image and its horizontal mirror are averaged
    (as Page's ResNet9 and airbench do): ``loss`` and ``acc`` are then that
    two-view result, and ``single_loss``/``single_acc`` the plain forward pass,
    from the same run. Without it both pairs are equal. Under torchrun the sums
    are over all processes. Restores the model's train/eval mode afterwards.
    """
    was_training = model.training
    model.eval()
    # loss, correct, single-view loss, single-view correct, images seen
    sums = torch.zeros(5, device=device)
    seen = 0
    start = time.perf_counter()
    for images, labels in loader:
        check_sigterm()
        images, labels = _to_device(images, labels, device, channels_last)
        with precision.autocast():
            single, mirrored = _views(model, images, tta)
        single = single.float()
        logits = single if mirrored is None else (single + mirrored.float()) / 2
        for k, out in ((0, logits), (2, single)):
            sums[k] += F.cross_entropy(out, labels, reduction="sum")
            sums[k + 1] += (out.argmax(1) == labels).sum()
        seen += labels.size(0)
    model.train(was_training)
    sums[4] = seen  # one count beside the sums, so one all_reduce carries both
    all_reduce_sum(sums)  # under torchrun each process saw its own share of the test set
    # .tolist() waits for the device, so the time is real
    loss, correct, single_loss, single_correct, _ = (sums / sums[4].clamp(min=1)).tolist()
    seconds = time.perf_counter() - start
    return {"loss": loss, "acc": 100.0 * correct, "single_loss": single_loss,
            "single_acc": 100.0 * single_correct, "seconds": seconds}


@torch.no_grad()
def predict(model, loader, device, precision, channels_last=False, tta=False) -> torch.Tensor:
    """Softmax probabilities (N, classes) on the CPU, in the loader's order.

    The same forward pass as ``evaluate`` (``tta`` included), so its argmax
    gives the same accuracy. Restores the model's train/eval mode afterwards.
    """
    was_training = model.training
    model.eval()
    probs = []
    for images, labels in loader:
        images, _ = _to_device(images, labels, device, channels_last)
        with precision.autocast():
            single, mirrored = _views(model, images, tta)
        logits = single.float() if mirrored is None else (single.float() + mirrored.float()) / 2
        probs.append(logits.softmax(1).cpu())
    model.train(was_training)
    return torch.cat(probs)
