"""The parts ``main.py`` assembles a run from: data, model, optimizer, schedule, range test.

Each function takes the resolved arguments and returns one piece; the epoch loop
itself stays in ``main.train`` where it can be read in one screen.
"""
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from model import MODELS, summary

from . import dist as dist_utils
from .checkpoint import CheckpointError
from .cpu_conv import use_cpu_convs
from .data import Split, balanced_subset, load_data, make_loader, test_transform, train_transform
from .errors import UserError
from .gpu_aug import DeviceLoader
from .gradcam import check_layer
from .lr_finder import LRFindError, range_test
from .plots import lr_finder_figure
from .schedule import one_cycle
from .seed import set_epoch


def load_splits(args):
    """(train, validation or None, test) Splits, cut to the class-balanced subsets asked for.

    ``--val-split N`` holds out N class-balanced training images, fixed by the seed,
    before ``--train-subset`` picks from the rest: the model never trains on them.
    """
    train, test = load_data(args.data_dir)
    val = None
    if args.val_split:
        if args.val_split >= len(train.labels):
            raise UserError(f"--val-split {args.val_split} leaves no training images of the "
                            f"{len(train.labels)}: pass fewer")
        held = balanced_subset(train.labels, args.val_split, args.seed)
        rest = np.setdiff1d(np.arange(len(train.labels)), held)
        val = Split(train.images[held], train.labels[held], list(train.classes))
        train = Split(train.images[rest], train.labels[rest], list(train.classes))
    for split, n, flag in ((train, args.train_subset, "--train-subset"), (test, args.test_subset, "--test-subset")):
        if n is None:
            continue
        if n > len(split.labels):
            left = " left after --val-split" if split is train and val is not None else " there"
            raise UserError(f"{flag} {n} is more than the {len(split.labels)} images{left}: "
                            f"pass at most {len(split.labels)}")
        idx = balanced_subset(split.labels, n, args.seed)
        split.images, split.labels = split.images[idx], split.labels[idx]
    if len(train.classes) == 1:
        print(f"warning: the data has one class ({train.classes[0]}): the model can only learn to "
              "predict it; add a folder per class to train a classifier", file=sys.stderr)
    return train, val, test


def check_parallel(args, ddp, device) -> None:
    """What a torchrun run needs, checked before any work."""
    if args.sync_bn and not (ddp.enabled and device.type == "cuda"):
        raise UserError("--sync-bn synchronises BatchNorm across GPUs: use it under torchrun on CUDA, "
                        "or drop it")
    if args.sync_bn and args.norm != "bn":
        raise UserError(f"--sync-bn only changes BatchNorm and this run has --norm {args.norm}: drop it")
    if not ddp.enabled:
        return
    if args.lr_find or args.lr == "auto":
        raise UserError("the LR range test runs in one process: run --lr-find without torchrun, "
                        "then pass the LR it suggests as --max-lr")
    if args.batch_size % ddp.world_size:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and does not split evenly "
                        f"over {ddp.world_size} processes: pass a multiple of {ddp.world_size}")


def use_gpu_aug(requested, device, *splits) -> bool:
    """``--gpu-aug`` as asked, or by default on CUDA: Albumentations workers give a few
    thousand images/s each (docs/speed.md), far below a GPU step's tens of thousands,
    while the batched device path keeps up. Not when the uint8 images would take over a
    quarter of the free GPU memory (a large image folder): then the workers load them."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return False
    size = sum(s.images.nbytes for s in splits if s is not None)
    return size <= torch.cuda.mem_get_info(device)[0] / 4


def build_loader(args, split, device, train: bool, ddp=None):
    """This process's loader of ``split``: a --gpu-aug DeviceLoader or an Albumentations DataLoader.

    ``ddp`` (one process when None) picks the shard and splits the global --batch-size.
    """
    ddp = ddp or dist_utils.Dist()
    batch = args.batch_size // ddp.world_size
    shard = {"rank": ddp.rank, "world_size": ddp.world_size}
    if args.gpu_aug:
        augment = {"cutout_p": args.cutout_p} if train else {}
        return DeviceLoader(split.images, split.labels, batch, device, train=train, **augment, **shard)
    persistent = device.type == "cuda" if args.persistent_workers is None else args.persistent_workers
    transform = train_transform(args.cutout_p) if train else test_transform()
    return make_loader(split, transform, batch, train=train, workers=args.workers,
                       pin_memory=device.type == "cuda", persistent=persistent, prefetch=args.prefetch,
                       **shard)


def build_model(args, num_classes, device, precision, channels_last):
    """(model on the device, its summary table, the CPU convolution switches it took)."""
    model = MODELS[args.model](num_classes=num_classes, norm=args.norm)
    try:  # a typo here must stop the run now, not after the last epoch
        check_layer(model, args.gradcam_layer)
    except UserError as exc:
        raise UserError(f"--gradcam-layer: {exc}") from None
    table = summary(model)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state_dict keys as BatchNorm2d
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    cpu_convs = {}
    if device.type == "cpu" and precision.dtype == torch.bfloat16:
        cpu_convs = use_cpu_convs(model, args.small_map_gemm, args.fp32_weight_grads)
    return model, table, cpu_convs


def build_optimizer(args, model, lr):
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum,
                           nesterov=args.nesterov and args.momentum > 0,
                           weight_decay=args.weight_decay)


def build_scheduler(args, optimizer, steps_per_epoch):
    total = args.epochs * steps_per_epoch
    if args.scheduler == "onecycle":
        # --peak-epoch < --epochs is checked already; rounding may still land on the first
        # or last step of a tiny run, so keep one step on each side where there are two
        peak = min(max(1, round(args.peak_epoch * steps_per_epoch)), max(1, total - 1))
        try:
            return one_cycle(optimizer, args.lr, total, peak, args.div_factor, args.annihilate)
        except ValueError as exc:
            raise UserError(f"{exc}: pass a smaller --annihilate or --peak-epoch") from None
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, [total // 2, total * 3 // 4], gamma=0.1)


def wrap(model, args, ddp, device):
    """(the network to train, the network to evaluate): DDP and torch.compile wrappers.

    ``model`` itself stays the plain module: checkpoints, Grad-CAM and the galleries use it.
    """
    train_net = model
    if ddp.enabled:
        train_net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_net = model
    if args.compile:
        train_net = torch.compile(train_net)
        eval_net = torch.compile(model) if ddp.enabled else train_net
    return train_net, eval_net


def setup_line(args, device, precision, channels_last, cpu_convs, ddp, step="eager") -> str:
    """The two lines every run prints first: hardware and data/recipe."""
    parallel = (f"processes: {ddp.world_size} (global batch {args.batch_size}, "
                f"{args.batch_size // ddp.world_size} each{', SyncBatchNorm' if args.sync_bn else ''}) | "
                if ddp.enabled else "")
    loading = "gpu-aug (on the device)" if args.gpu_aug else f"workers: {args.workers}"
    sizes = args.data
    val = f"{sizes['val']} validation, " if sizes["val"] else ""
    return (f"device: {device} | precision: {precision.name} ({precision.why}) | memory format: "
            f"{'channels_last' if channels_last else 'NCHW'} | threads: {torch.get_num_threads()} | "
            f"{parallel}{loading} | step: {step}{' | torch.compile' if args.compile else ''}"
            f"{' | 4x4 convs as GEMM' if cpu_convs.get('small_map_gemm') else ''}"
            f"{' | fp32 weight grads of square convs' if cpu_convs.get('fp32_weight_grads') else ''}\n"
            f"data: {args.data_dir} ({sizes['train']} train, {val}{sizes['test']} test, "
            f"{len(sizes['classes'])} classes) | "
            f"batch {args.batch_size} | {args.optimizer} lr {args.lr} | {args.scheduler} | "
            f"epochs {args.epochs} | test-time flip {'on' if args.tta else 'off'} | seed {args.seed}")


def find_lr(args, model, criterion, loader, device, precision, channels_last, run) -> str:
    """Run the range test on the training loader, save lr_finder.png/.csv, set args.lr if auto.

    Returns the lines it printed, for summary.txt. The model comes back as it was.
    """
    set_epoch(loader, args.seed, 0)  # its own shuffle; epoch 1 still gets epoch 1's
    optimizer = build_optimizer(args, model, args.lr_find_start)
    print(f"LR range test: {args.lr_find_start:g} to {args.lr_find_end:g} over up to "
          f"{args.lr_find_iters} batches of {args.batch_size}", flush=True)
    try:
        result = range_test(model, optimizer, criterion, loader, device, precision, channels_last,
                            start_lr=args.lr_find_start, end_lr=args.lr_find_end, iters=args.lr_find_iters)
    except LRFindError as exc:
        raise UserError(f"LR range test: {exc}") from None
    auto = args.lr == "auto"
    if auto:
        args.lr = result["suggestion"]
    args.lr_suggested = result["suggestion"]
    min_lr = args.lr / args.div_factor
    run.make()
    run.figure("lr_finder.png", lr_finder_figure(result, args.lr, min_lr))
    run.write_csv("lr_finder.csv", [{"lr": lr, "smoothed_loss": loss} for lr, loss
                                    in zip(result["lr"], result["loss"], strict=True)], ["lr", "smoothed_loss"])
    stop = "stopped early: the loss diverged" if result["stopped_early"] else "ran to the end"
    chosen = "the suggestion" if auto else "--max-lr; auto would take the suggestion"
    text = (f"LR range test ({len(result['lr'])} batches, {stop}): suggested lr "
            f"{result['suggestion']:.3g} (steepest descent of the smoothed loss)\n"
            f"One Cycle: max lr {args.lr:.3g} ({chosen}), "
            f"min lr {min_lr:.3g} (max / --div-factor {args.div_factor:g})\n")
    print(text, end="", flush=True)
    return text


@dataclass
class Progress:
    """What the epoch loop carries from epoch to epoch, and back from a checkpoint."""

    history: list = field(default_factory=list)  # one metrics row per finished epoch
    best_acc: float = 0.0
    epoch: int = 0  # the last finished epoch, the one last.pt holds
    lrs: list = field(default_factory=list)  # the lr of every optimizer step so far

    @classmethod
    def restore(cls, resume, model, optimizer, scheduler, scaler) -> "Progress":
        """A fresh start, or the --resume checkpoint's state loaded into the four objects."""
        if resume is None:
            return cls()
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"the checkpoint's weights do not fit {type(model).__name__} "
                                  f"({str(exc).splitlines()[0]}): resume on the data it was made with") from None
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        return cls(list(resume["history"]), float(resume["best_acc"]), int(resume["epoch"]),
                   list(resume["lrs"]))

    def record(self, epoch: int, tr: dict, va, te: dict) -> bool:
        """Append the epoch's metrics row; True when it is the best so far.

        "Best" is the validation accuracy when there is a validation split (``va``),
        else the test accuracy. A non-finite evaluation loss means a non-finite model:
        a UserError, so it is never saved.
        """
        for name, result in (("validation", va), ("test", te)):
            if result is not None and not math.isfinite(result["loss"]):
                raise UserError(f"the {name} loss of epoch {epoch} is {result['loss']}: the model is no "
                                f"longer finite; last.pt holds epoch {self.epoch}: start a new run with a "
                                "lower --max-lr")
        self.history.append({"epoch": epoch, "lr": tr["lr"], "train_loss": tr["loss"], "train_acc": tr["acc"],
                             "val_loss": "" if va is None else va["loss"], "val_acc": "" if va is None else va["acc"],
                             "test_loss": te["loss"], "test_acc": te["acc"],
                             "test_acc_single": te["single_acc"], "seconds": tr["seconds"] + te["seconds"]
                             + (0 if va is None else va["seconds"])})
        chosen = (te if va is None else va)["acc"]
        is_best = chosen > self.best_acc
        self.best_acc = max(self.best_acc, chosen)
        return is_best

    def state(self) -> dict:
        """The checkpoint fields that come from here (the epoch is the newest row's)."""
        return {"epoch": self.history[-1]["epoch"], "best_acc": self.best_acc, "history": self.history,
                "lrs": self.lrs}

    def line(self, tr: dict, va, te: dict, is_best: bool, tta: bool) -> str:
        """The printed summary of the newest epoch; "(best)" marks the accuracy best.pt follows."""
        single = f" (single view {te['single_acc']:.2f}%)" if tta else ""
        best = " (best)" if is_best else ""
        val = "" if va is None else f"val loss {va['loss']:.4f} acc {va['acc']:.2f}%{best} | "
        return (f"lr {tr['lr']:.4g} | train loss {tr['loss']:.4f} acc {tr['acc']:.2f}% | {val}"
                f"test loss {te['loss']:.4f} acc {te['acc']:.2f}%{best if va is None else ''}{single} | "
                f"{self.history[-1]['seconds']:.1f}s ({tr['images_per_s']:.0f} img/s train)")

    def best_row(self) -> dict:
        """The row best.pt holds: the first epoch with the highest validation (else test) accuracy."""
        key = "val_acc" if self.best_on == "val" else "test_acc"
        return max(self.history, key=lambda r: (float(r[key]), -r["epoch"]))

    @property
    def best_on(self) -> str:
        """"val" when the run has a validation split, else "test"."""
        return "val" if self.history and self.history[-1].get("val_acc", "") != "" else "test"

    def result(self, tta: bool) -> str:
        """summary.txt's result lines: final accuracies, which epoch best.pt holds and why."""
        final, best = self.history[-1], self.best_row()
        views = (f" (flip TTA; single view {final['test_acc_single']:.2f}%)"
                 if tta and "test_acc_single" in final else "")
        val = f" | validation {final['val_acc']:.2f}%" if self.best_on == "val" else ""
        if self.best_on == "val":
            chosen = (f"chosen on validation accuracy ({best['val_acc']:.2f}%); its test accuracy "
                      f"{best['test_acc']:.2f}%")
        else:
            chosen = (f"chosen on the test set ({best['test_acc']:.2f}%), so that figure is optimistic: "
                      "--val-split N chooses on held-out training images instead")
        return (f"final test accuracy {final['test_acc']:.2f}%{views}{val} | "
                f"{sum(r['seconds'] for r in self.history):.0f}s of epochs\n"
                f"best.pt: epoch {best['epoch']}, {chosen}\n")
