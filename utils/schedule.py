"""One Cycle as the assignment states it: linear up to the peak, linear back down, no tail.

Smith & Topin, "Super-Convergence" (2017), https://arxiv.org/abs/1708.07120, in
the form of Page's ResNet9 runs (peak at epoch 5 of 24). Unlike PyTorch's
``OneCycleLR`` (which by default ends 10,000x below the starting lr, and puts
the peak at a float fraction of the steps), the lr comes back exactly to where
it started, ``max_lr / div_factor``, at the last step, and the peak falls on
the step asked for. ``annihilate`` adds Smith's third phase: the last fraction
of the steps takes the lr from the starting value down 100x further.

Steps are the optimizer's steps counted from 1: step k trains with ``lr(k)``.
"""
import numpy as np
import torch

ANNIHILATE_DROP = 100  # Smith: "several orders of magnitude" below the starting lr


def one_cycle_knots(max_lr: float, total_steps: int, peak_step: int, div_factor: float = 25.0,
                    annihilate: float = 0.0) -> tuple:
    """(steps, lrs) of the piecewise-linear schedule; steps count from 1."""
    if total_steps == 1:  # a one-step run: the peak is all there is
        return [1], [max_lr]
    if not 1 <= peak_step < total_steps:
        raise ValueError(f"the peak step {peak_step} must lie in 1..{total_steps - 1}")
    start = max_lr / div_factor
    steps, lrs = [1, peak_step, total_steps], [start, max_lr, start]
    if annihilate > 0:
        back = total_steps - round(annihilate * total_steps)  # back at the start lr here
        if back <= peak_step:
            raise ValueError(f"--annihilate {annihilate} leaves no steps between the peak "
                             f"(step {peak_step}) and the third phase")
        steps, lrs = [1, peak_step, back, total_steps], [start, max_lr, start, start / ANNIHILATE_DROP]
    if peak_step == 1:  # the first step already at the peak: no warm-up
        steps, lrs = steps[1:], lrs[1:]
    return steps, lrs


def one_cycle(optimizer, max_lr: float, total_steps: int, peak_step: int, div_factor: float = 25.0,
              annihilate: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR, stepped once per batch, that follows ``one_cycle_knots``."""
    steps, lrs = one_cycle_knots(max_lr, total_steps, peak_step, div_factor, annihilate)
    factors = np.asarray(lrs) / max_lr
    for group in optimizer.param_groups:
        group["lr"] = max_lr  # LambdaLR multiplies the groups' lr by the factor

    def factor(done: int) -> float:  # ``done`` steps taken, so the next one is step done + 1
        return float(np.interp(done + 1, steps, factors))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
