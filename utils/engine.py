"""One function per phase: ``train_one_epoch`` and ``evaluate`` print nothing and return dicts of floats."""
import time

import torch
import torch.nn.functional as F


def _to_device(images, labels, device, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device, precision,
                    channels_last=False, log=None, log_interval=20, lr_log=None) -> dict:
    """One pass over ``loader``; the scheduler steps every batch.

    Loss and correct counts accumulate on the device; ``log(running)`` is called
    every ``log_interval`` batches with the running loss and accuracy, and
    that is the only place the loop waits for the device. ``lr_log``, a list,
    gets the lr each batch used, read from the optimizer.
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, lr = 0, optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    for step, (images, labels) in enumerate(loader, 1):
        images, labels = _to_device(images, labels, device, channels_last)
        with precision.autocast():
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]  # the rate this batch used
        if lr_log is not None:
            lr_log.append(lr)
        scheduler.step()

        loss_sum += loss.detach() * labels.size(0)
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.size(0)
        if log is not None and (step % log_interval == 0 or step == len(loader)):
            # .item() is a host-device sync point; once per log interval only.
            log({"loss": loss_sum.item() / seen, "acc": 100.0 * correct.item() / seen, "lr": lr})
    seconds = time.perf_counter() - start
    return {"loss": loss_sum.item() / max(seen, 1), "acc": 100.0 * correct.item() / max(seen, 1),
            "lr": lr, "seconds": seconds, "images_per_s": seen / seconds}


@torch.no_grad()
def evaluate(model, loader, device, precision, channels_last=False) -> dict:
    """Mean cross-entropy (no label smoothing) and accuracy in percent.

    Restores the model's train/eval mode afterwards.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with precision.autocast():
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.size(0)
    model.train(was_training)
    seconds = time.perf_counter() - start
    return {"loss": loss_sum.item() / max(seen, 1), "acc": 100.0 * correct.item() / max(seen, 1),
            "seconds": seconds}


@torch.no_grad()
def predict(model, loader, device, precision, channels_last=False) -> torch.Tensor:
    """Softmax probabilities (N, classes) on the CPU, in the loader's order.

    The same forward pass as ``evaluate``, so its argmax gives the same accuracy.
    Restores the model's train/eval mode afterwards.
    """
    was_training = model.training
    model.eval()
    probs = []
    for images, labels in loader:
        images, _ = _to_device(images, labels, device, channels_last)
        with precision.autocast():
            logits = model(images)
        probs.append(logits.float().softmax(1).cpu())
    model.train(was_training)
    return torch.cat(probs)
