"""Leslie Smith's LR range test, run by the torch-lr-finder library.

Smith, "Cyclical Learning Rates for Training Neural Networks" (2017),
https://arxiv.org/abs/1506.01186, section 3.3. torch-lr-finder
(https://github.com/davidtvs/pytorch-lr-finder) does the sweep: an exponential
rise of the lr over ``iters`` training batches, an exponentially smoothed loss,
an early stop once that loss exceeds 5x its best, and ``reset()`` to put the
model's and the optimizer's state dicts back. This wrapper adds what a run
here needs: the same mixed precision and memory format as training, the
model's train/eval mode restored, and a suggestion.

The suggestion is the library's ``plot(suggest_lr=True)`` rule, the steepest
descent of the smoothed loss with the first 10 points skipped, searched only on
the way down, up to the loss's minimum. Past the minimum a classifier with
BatchNorm rarely "diverges" by the library's test (5x the best loss: chance is
only ~1.1x here); its loss wobbles near chance instead, and the library's rule,
searching the whole curve, picked such a wobble (lr 0.118, past the minimum at
0.02) in ResNet-18's range test on the CIFAR-10 JPEGs.
"""
import contextlib
import io

import numpy as np
import torch
from torch_lr_finder import LRFinder, TrainDataLoaderIter

SKIP_START = 10  # torch-lr-finder's plot() default: the first points are mostly smoothing warm-up
DIVERGE = 5  # stop once the smoothed loss is 5x its best (the library's default)


class LRFindError(RuntimeError):
    """The sweep ended too early to suggest anything."""


class _Batches(TrainDataLoaderIter):
    """The training loader's batches in the memory format the model trains in."""

    def __init__(self, loader, channels_last: bool):
        super().__init__(loader)
        self.channels_last = channels_last

    def inputs_labels_from_batch(self, batch):
        images, labels = batch
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels


def range_test(model, optimizer, criterion, loader, device, precision, channels_last=False,
               start_lr=1e-7, end_lr=10.0, iters=200, smooth=0.05) -> dict:
    """Sweep the lr from ``start_lr`` to ``end_lr`` over ``iters`` batches, then undo it.

    Returns ``{"lr": [...], "loss": [...], "suggestion": float, "index": int,
    "lowest": int, "stopped_early": bool}``: the lr of each batch, the smoothed
    loss after it, the lr (and its index) at the steepest descent before the
    loss's minimum (index ``lowest``). The model's and the optimizer's state
    (weights, BN statistics, momentum) and the model's mode are as before.
    """
    was_training = model.training
    amp = precision.dtype is not None
    finder = LRFinder(model, optimizer, criterion, device=device,
                      amp_backend="torch" if amp else None,
                      amp_config={"device_type": precision.device_type, "dtype": precision.dtype},
                      grad_scaler=precision.grad_scaler() if amp else None)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its prints name its own API, not our flags
            finder.range_test(_Batches(loader, channels_last), start_lr=start_lr, end_lr=end_lr,
                              num_iter=iters, step_mode="exp", smooth_f=smooth, diverge_th=DIVERGE)
    finally:
        finder.reset()
        model.train(was_training)
    lrs, losses = list(finder.history["lr"]), [float(x) for x in finder.history["loss"]]
    bad = next((i for i, x in enumerate(losses) if not np.isfinite(x)), None)
    if bad is not None:  # a NaN never exceeds the divergence threshold: cut it off here
        lrs, losses = lrs[:bad], losses[:bad]
    lowest = int(np.argmin(losses)) if losses else 0
    if lowest < SKIP_START + 2:
        raise LRFindError(f"the smoothed loss stopped falling after {lowest + 1} of {len(lrs)} batches, "
                          "too soon to suggest an lr: lower --lr-find-start or raise --lr-find-iters")
    descent = np.asarray(losses[SKIP_START:lowest + 1])
    index = SKIP_START + int(np.gradient(descent).argmin())
    return {"lr": lrs, "loss": losses, "suggestion": float(lrs[index]), "index": index,
            "lowest": lowest, "stopped_early": len(lrs) < iters}
