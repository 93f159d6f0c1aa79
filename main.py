"""Train and test ResNet-18 (BN / GN / LN) or the custom ResNet on CIFAR-10.

    python main.py --model resnet18 --epochs 20
    python main.py --model resnet18 --norm gn --epochs 20
    python main.py --model custom_resnet --epochs 24

Every run writes a folder (``--out-dir``, default ``runs/<model>-<norm>-<time>``):
args.json, summary.txt, metrics.csv, last.pt, best.pt during training; then curves.png,
lr.png and, from the final model, per_class.csv, confusion.png, misclassified.png (and
.csv) and gradcam.png. ``--lr-find`` adds lr_finder.png (``--epochs 0``: only that).
report.html, one self-contained page of all of it, is rewritten after every epoch.
``--resume runs/X/last.pt`` continues an interrupted run. ``--analyze`` describes the
data instead of training (class counts, samples, image sizes, channel statistics).
"""
import argparse
import contextlib
import io
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import gradcam
from model import MODELS, NORMS
from utils import io as run_io
from utils.analysis import channel_stats, class_counts, confusion_matrix, per_class, top_losses
from utils.cifar import MEAN, STD, to_uint8_image
from utils.cpu_conv import use_cpu_convs
from utils.data import (DataError, balanced_subset, default_workers, image_sizes, load_data,
                        make_loader, test_transform, train_transform)
from utils import dist as dist_utils
from utils.device import SetupError, choose_precision, configure_backends, resolve_device, use_channels_last
from utils.engine import evaluate, predict, train_one_epoch
from utils.gpu_aug import DeviceLoader
from utils.lr_finder import LRFindError, range_test
from utils.plots import (class_counts_figure, confusion_figure, image_grid, image_sizes_figure,
                         lr_figure, lr_finder_figure, plot_curves, save_figure)
from utils.report import write_report
from utils.schedule import one_cycle
from utils.seed import seed_everything, set_epoch

# Per-model defaults for the flags left unset. ResNet-18 follows kuangliu/pytorch-cifar
# (batch 128, SGD lr 0.1, weight decay 5e-4), with One Cycle instead of 200 cosine
# epochs. The custom ResNet is Page's recipe (batch 512, Nesterov SGD, peak 0.4 at
# epoch 5): on the CIFAR-10 JPEGs its range test's loss bottoms out at 0.33, Smith's
# upper bound for a cycle (README, "Recipes"). One Cycle runs from and back to
# peak / --div-factor (100), where that range test's loss starts to fall.
RECIPES = {
    "resnet18": {"epochs": 20, "batch_size": 128, "lr": 0.1},
    "custom_resnet": {"epochs": 24, "batch_size": 512, "lr": 0.4},
}
ADAM_LR = 1e-3  # peak lr for --optimizer adam when --lr is not given
# a resumed run must keep the schedule it started with
SCHEDULE_FLAGS = ("epochs", "batch_size", "scheduler", "peak_epoch", "div_factor", "annihilate")
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "scaler", "epoch", "best_acc", "args", "history"}
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "test_acc_single",
                  "seconds"]


class CLIError(Exception):
    """Bad input: main() prints ``error: <message>`` and returns 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: see --help for that
        raise CLIError(f"{message} (see python main.py --help)")


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _float_in(low, high, low_open=False, high_open=False):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {value}")
        return value
    return parse


def _lr(text):
    """A learning rate, or ``auto`` for the range test's suggestion."""
    if text == "auto":
        return text
    try:
        return _float_in(0, 10, low_open=True)(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or auto)") from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=list(MODELS), help="architecture")
    p.add_argument("--norm", default="bn", choices=NORMS,
                   help="normalisation: BatchNorm, GroupNorm (32 groups) or LayerNorm over (C,H,W)")
    p.add_argument("--epochs", type=_int_at_least(0), default=None,
                   help="epochs (default: 20 for resnet18, 24 for custom_resnet; 0 with --lr-find: "
                        "run the range test only)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=None,
                   help="batch size (default: 128 for resnet18, 512 for custom_resnet); under torchrun "
                        "the global batch, split evenly over the processes, so a recipe keeps its "
                        "batch and learning rate on any number of GPUs")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="optimizer")
    g.add_argument("--max-lr", "--lr", dest="lr", type=_lr, default=None,
                   help="peak learning rate, or auto for the LR range test's suggestion "
                        "(default: 0.1 resnet18, 0.4 custom_resnet; 1e-3 with adam)")
    g.add_argument("--momentum", type=_float_in(0, 1, high_open=True), default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="Nesterov momentum for SGD")
    g.add_argument("--weight-decay", type=_float_in(0, 1), default=5e-4, help="L2 weight decay")
    g.add_argument("--label-smoothing", type=_float_in(0, 1, high_open=True), default=0.1,
                   help="label smoothing of the training loss")
    g.add_argument("--scheduler", default="onecycle", choices=["onecycle", "cosine", "step"],
                   help="lr schedule, stepped every batch; step divides the lr by 10 at 50%% and 75%%")
    g.add_argument("--peak-epoch", type=_float_in(0, 1e6, low_open=True), default=None,
                   help="One Cycle: epoch of the peak lr (default: 5 for 24 epochs, scaled to --epochs)")
    g.add_argument("--div-factor", type=_float_in(1, 1e6), default=100.0,
                   help="One Cycle: starting (and final) lr = max lr / div-factor")
    g.add_argument("--annihilate", type=_float_in(0, 1, high_open=True), nargs="?", const=0.1,
                   default=0.0, help="One Cycle: fraction of the steps (0.1 if given bare) in a third "
                                     "phase, from the starting lr down 100x further; 0: none")

    g = p.add_argument_group("LR range test (Smith 2017, via torch-lr-finder)")
    g.add_argument("--lr-find", action="store_true",
                   help="run the range test before training: lr_finder.png, suggested max and min lr")
    g.add_argument("--lr-find-start", type=_float_in(0, 10, low_open=True), default=1e-7,
                   help="first lr of the exponential sweep")
    g.add_argument("--lr-find-end", type=_float_in(0, 100, low_open=True), default=10.0,
                   help="last lr of the sweep")
    g.add_argument("--lr-find-iters", type=_int_at_least(20), default=200,
                   help="training batches in the sweep (it stops early once the loss diverges)")

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="./data",
                   help="torchvision CIFAR-10 root (downloaded on first use), or a folder with "
                        "train/<class>/ and test/<class>/ images")
    g.add_argument("--train-subset", type=_int_at_least(1), default=None,
                   help="train on a fixed class-balanced subset of N images")
    g.add_argument("--test-subset", type=_int_at_least(1), default=None,
                   help="test on a fixed class-balanced subset of N images")
    g.add_argument("--cutout-p", type=_float_in(0, 1), default=0.5,
                   help="probability of the 8x8 cutout hole")
    g.add_argument("--analyze", action="store_true",
                   help="describe the data and train nothing: class counts, 10 samples per class, "
                        "image sizes, per-channel mean and std beside the loaders' constants")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="test-time flip: test accuracy averages the logits of each image and its "
                        "mirror image; the single-view accuracy is logged beside it")
    g.add_argument("--workers", type=_int_at_least(0), default=default_workers(),
                   help="data loader worker processes")

    g = p.add_argument_group("hardware and reproducibility")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision: bf16 on CUDA and on CPUs with native bf16, fp16 on older "
                        "GPUs, fp32 elsewhere")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format where it is faster (CUDA, CPU)")
    g.add_argument("--seed", type=int, default=1, help="seed for Python, NumPy, torch and the loaders")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only, for bit-for-bit repeatable runs")

    g = p.add_argument_group("speed (README, \"Speed\")")
    g.add_argument("--gpu-aug", action="store_true",
                   help="hold the data on the training device as uint8 and augment whole batches there "
                        "(same pad-crop, flip and cutout): for when the CPU cannot feed the GPU")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (its first epoch pays the compile time)")
    g.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="let cuDNN time its convolution algorithms once and keep the fastest (CUDA)")
    g.add_argument("--persistent-workers", action=argparse.BooleanOptionalAction, default=None,
                   help="keep loader workers alive between epochs (default: on with CUDA; they then "
                        "continue their augmentation streams instead of reseeding every epoch)")
    g.add_argument("--prefetch", type=_int_at_least(1), default=4,
                   help="batches each loader worker prepares ahead")
    g.add_argument("--small-map-gemm", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU with bf16: convolutions with outputs of 4x4 or smaller run as im2col and one "
                        "matrix multiply, about 3x faster there than oneDNN's kernels (utils/cpu_conv.py)")
    g.add_argument("--fp32-weight-grads", action="store_true",
                   help="CPU with bf16: square convolutions compute their weight gradients in fp32; "
                        "much faster when other processes share the cores (utils/cpu_conv.py)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")

    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default=None, help="run folder (default: runs/<model>-<norm>-<time>, "
                                                   "or the checkpoint's folder with --resume)")
    g.add_argument("--resume", default=None, metavar="PATH", help="continue from a last.pt or best.pt")
    g.add_argument("--log-interval", type=_int_at_least(1), default=20,
                   help="batches between progress-bar updates")
    g.add_argument("--gallery-size", type=_int_at_least(0), default=25,
                   help="misclassified test images in misclassified.png and gradcam.png (0: none)")
    g.add_argument("--gradcam-layer", default=None,
                   help="dotted name of the Grad-CAM layer (default: "
                        + ", ".join(f"{n} for {m}" for m, n in gradcam.DEFAULT_LAYERS.items())
                        + "; 8x8 maps, see gradcam.py)")
    return p


def resolve_args(args) -> argparse.Namespace:
    """Fill the per-model defaults and check what argparse cannot check alone."""
    recipe = RECIPES[args.model]
    args.epochs = recipe["epochs"] if args.epochs is None else args.epochs
    args.batch_size = args.batch_size or recipe["batch_size"]
    if args.lr is None:
        args.lr = ADAM_LR if args.optimizer == "adam" else recipe["lr"]
    if args.peak_epoch is None:
        args.peak_epoch = round(args.epochs * 5 / 24, 3)
    args.gradcam_layer = args.gradcam_layer or gradcam.DEFAULT_LAYERS[args.model]
    if args.epochs == 0 and not args.lr_find:
        raise CLIError("--epochs 0 trains nothing: pass --lr-find with it to run only the range "
                       "test, or at least 1 epoch")
    if args.lr_find_start >= args.lr_find_end:
        raise CLIError(f"--lr-find-start {args.lr_find_start} must be below --lr-find-end "
                       f"{args.lr_find_end}: the sweep goes up")
    if args.analyze and (args.resume or args.lr_find):
        raise CLIError("--analyze only describes the data: run it without --resume and --lr-find")
    if args.resume and args.lr_find:
        raise CLIError("--lr-find runs before training starts, not on a resumed run: drop --lr-find")
    if args.epochs and args.scheduler == "onecycle" and args.peak_epoch >= args.epochs:
        raise CLIError(f"--peak-epoch {args.peak_epoch} must be below --epochs {args.epochs}: "
                       "pass a smaller --peak-epoch")
    return args


# ------------------------------------------------------------------------ setup
def check_out_dir(args, resume_ckpt) -> Path:
    """Resolve --out-dir and check it can be written, creating nothing yet.

    The folder is made only when the run writes its first file, so bad data
    found later leaves no empty run folder behind.
    """
    if args.out_dir is None:
        if args.resume:
            args.out_dir = str(Path(args.resume).parent)
        elif args.analyze:
            args.out_dir = f"runs/analyze-{time.strftime('%Y%m%d-%H%M%S')}"
        else:
            args.out_dir = f"runs/{args.model}-{args.norm}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out_dir)
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a folder" if not existing.is_dir() else "is not writable"
        raise _unwritable(out, f"{existing} {problem}")
    if resume_ckpt is None and any((out / n).exists() for n in ("last.pt", "best.pt")):
        raise CLIError(f"{out} already holds a checkpoint: continue it with --resume {out / 'last.pt'}, "
                       "or choose another --out-dir")
    return out


def _unwritable(out: Path, reason) -> CLIError:
    return CLIError(f"cannot write to --out-dir {out} ({reason}): choose a writable --out-dir")


def make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(out, exc.strerror or exc) from None


def read_resume(args):
    """Load and check the --resume checkpoint before anything is written."""
    if not args.resume:
        return None
    path = Path(args.resume)
    if not path.is_file():
        raise CLIError(f"--resume {path} does not exist: pass the path of a run's last.pt")
    try:
        ckpt = run_io.load_checkpoint(path)
        missing = CHECKPOINT_KEYS - set(ckpt)
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))}")
        saved = ckpt["args"]
    except Exception as exc:  # any unpickling or format failure means the same to the user
        raise CLIError(f"cannot read checkpoint {path} ({type(exc).__name__}): "
                       "pass a last.pt or best.pt written by main.py") from None
    if (saved["model"], saved["norm"]) != (args.model, args.norm):
        raise CLIError(f"checkpoint {path} is {saved['model']} (norm {saved['norm']}), but this run asks "
                       f"for {args.model} (norm {args.norm}): pass --model {saved['model']} "
                       f"--norm {saved['norm']}, or another checkpoint")
    for flag in SCHEDULE_FLAGS:
        if flag in saved and saved[flag] != getattr(args, flag):
            name = "--" + flag.replace("_", "-")
            raise CLIError(f"checkpoint {path} was trained with {name} {saved[flag]}, this run has "
                           f"{getattr(args, flag)}: the schedule must match, pass {name} {saved[flag]}")
    if args.lr == "auto":  # found by the range test when the run started
        args.lr = saved["lr"]
    return ckpt


def load_splits(args):
    """Train and test Splits, cut to the class-balanced subsets asked for."""
    splits = load_data(args.data_dir)
    for split, n, flag in zip(splits, (args.train_subset, args.test_subset),
                              ("--train-subset", "--test-subset"), strict=True):
        if n is None:
            continue
        if n > len(split.labels):
            raise CLIError(f"{flag} {n} is more than the {len(split.labels)} images there: "
                           f"pass at most {len(split.labels)}")
        idx = balanced_subset(split.labels, n, args.seed)
        split.images, split.labels = split.images[idx], split.labels[idx]
    return splits


def check_parallel(args, ddp, device) -> None:
    """What a torchrun run needs, checked before any work."""
    if args.sync_bn and not (ddp.enabled and device.type == "cuda"):
        raise CLIError("--sync-bn synchronises BatchNorm across GPUs: use it under torchrun on CUDA, or drop it")
    if args.sync_bn and args.norm != "bn":
        raise CLIError(f"--sync-bn only changes BatchNorm and this run has --norm {args.norm}: drop it")
    if not ddp.enabled:
        return
    if args.lr_find or args.lr == "auto":
        raise CLIError("the LR range test runs in one process: run --lr-find without torchrun, "
                       "then pass the LR it suggests as --max-lr")
    if args.batch_size % ddp.world_size:
        raise CLIError(f"--batch-size {args.batch_size} is the global batch and does not split evenly over "
                       f"{ddp.world_size} processes: pass a multiple of {ddp.world_size}")


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


def model_summary(model) -> str:
    """torchsummary's table, computed on the CPU in eval mode so BN statistics stay untouched."""
    from torchsummary import summary

    was_training = model.training
    model.eval()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary(model, (3, 32, 32), device="cpu")
    model.train(was_training)
    return buf.getvalue()


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
            raise CLIError(f"{exc}: pass a smaller --annihilate or --peak-epoch") from None
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, [total // 2, total * 3 // 4], gamma=0.1)


# ------------------------------------------------------------------------ run
def find_lr(args, model, criterion, loader, device, precision, channels_last, out) -> str:
    """Run the range test on the training loader, save lr_finder.png, set args.lr if auto.

    Returns the lines it printed, for summary.txt. The model comes back as it was.
    """
    set_epoch(loader, args.seed, 0)  # its own shuffle; epoch 1 still gets epoch 1's
    optimizer = build_optimizer(args, model, args.lr_find_start)
    print(f"LR range test: {args.lr_find_start:g} to {args.lr_find_end:g} over up to "
          f"{args.lr_find_iters} batches of {args.batch_size}", flush=True)
    try:
        result = range_test(model, optimizer, criterion, loader, device, precision, channels_last,
                            start_lr=args.lr_find_start, end_lr=args.lr_find_end,
                            iters=args.lr_find_iters)
    except LRFindError as exc:
        raise CLIError(f"LR range test: {exc}") from None
    auto = args.lr == "auto"
    if auto:
        args.lr = result["suggestion"]
    args.lr_suggested = result["suggestion"]
    max_lr = args.lr
    min_lr = max_lr / args.div_factor
    make_out_dir(out)
    save_figure(lr_finder_figure(result, max_lr, min_lr), out / "lr_finder.png")
    run_io.write_csv(out / "lr_finder.csv", [{"lr": lr, "smoothed_loss": loss} for lr, loss
                                             in zip(result["lr"], result["loss"], strict=True)],
                     ["lr", "smoothed_loss"])
    stop = "stopped early: the loss diverged" if result["stopped_early"] else "ran to the end"
    text = (f"LR range test ({len(result['lr'])} batches, {stop}): suggested lr "
            f"{result['suggestion']:.3g} (steepest descent of the smoothed loss)\n"
            f"One Cycle: max lr {max_lr:.3g} ({'the suggestion' if auto else '--max-lr; auto would take the suggestion'}), "
            f"min lr {min_lr:.3g} (max / --div-factor {args.div_factor:g})\n")
    print(text, end="", flush=True)
    return text


def train(args) -> int:
    resume = read_resume(args)
    out = check_out_dir(args, resume)
    ddp, device = dist_utils.from_env(), resolve_device(args.device)
    check_parallel(args, ddp, device)
    device = dist_utils.init(ddp, device)
    main_proc = ddp.main  # under torchrun only rank 0 prints and writes
    seed_everything(args.seed, args.deterministic)
    configure_backends(device, args.cudnn_benchmark, args.deterministic)
    precision = choose_precision(device, args.amp)
    channels_last = use_channels_last(device, args.channels_last, args.norm)

    train_split, test_split = load_splits(args)
    classes = train_split.classes
    train_loader = build_loader(args, train_split, device, train=True, ddp=ddp)
    test_loader = build_loader(args, test_split, device, train=False, ddp=ddp)

    model = MODELS[args.model](num_classes=len(classes), norm=args.norm)
    try:  # a typo here must stop the run now, not after the last epoch
        gradcam.check_layer(model, args.gradcam_layer)
    except gradcam.LayerError as exc:
        raise CLIError(f"--gradcam-layer: {exc}") from None
    table = model_summary(model)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state_dict keys as BatchNorm2d
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    cpu_convs = {}
    if device.type == "cpu" and precision.dtype == torch.bfloat16:
        cpu_convs = use_cpu_convs(model, args.small_map_gemm, args.fp32_weight_grads)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    print(table, end="")

    found = ""
    if args.lr_find or args.lr == "auto":
        found = find_lr(args, model, criterion, train_loader, device, precision, channels_last, out)
        if args.epochs == 0:
            run_io.write_json(out / "args.json", vars(args))
            run_io.write_text(out / "summary.txt", table + found)
            write_report(out)
            print(f"run folder: {out}")
            return 0
    optimizer = build_optimizer(args, model, args.lr)
    scheduler = build_scheduler(args, optimizer, len(train_loader))
    scaler = precision.grad_scaler()

    history, best_acc, start_epoch, lrs = [], 0.0, 1, []
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as exc:
            raise CLIError(f"checkpoint {args.resume} does not fit {args.model} with {len(classes)} "
                           f"classes ({str(exc).splitlines()[0]}): train on the data it was made with") from None
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        history, best_acc, start_epoch = resume["history"], resume["best_acc"], resume["epoch"] + 1
        lrs = resume.get("lrs", [])

    # `model` stays the plain module: checkpoints, Grad-CAM and the galleries use it
    train_net = model
    if ddp.enabled:
        train_net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_net = model
    if args.compile:
        train_net = torch.compile(train_net)
        eval_net = torch.compile(model) if ddp.enabled else train_net

    parallel = (f"processes: {ddp.world_size} (global batch {args.batch_size}, "
                f"{args.batch_size // ddp.world_size} each{', SyncBatchNorm' if args.sync_bn else ''}) | "
                if ddp.enabled else "")
    loading = "gpu-aug (on the device)" if args.gpu_aug else f"workers: {args.workers}"
    setup = (f"device: {device} | precision: {precision.name} | memory format: "
             f"{'channels_last' if channels_last else 'NCHW'} | threads: {torch.get_num_threads()} | "
             f"{parallel}{loading}{' | torch.compile' if args.compile else ''}"
             f"{' | 4x4 convs as GEMM' if cpu_convs.get('small_map_gemm') else ''}"
             f"{' | fp32 weight grads of square convs' if cpu_convs.get('fp32_weight_grads') else ''}\n"
             f"data: {args.data_dir} ({len(train_split.labels)} train, {len(test_split.labels)} test, "
             f"{len(classes)} classes) | batch {args.batch_size} | {args.optimizer} lr {args.lr} | "
             f"{args.scheduler} | epochs {args.epochs} | test-time flip {'on' if args.tta else 'off'} | "
             f"seed {args.seed}")
    print(setup)
    if main_proc:
        make_out_dir(out)
        run_io.write_json(out / "args.json", vars(args))
        run_io.write_text(out / "summary.txt", table + found + setup + "\n")
        write_report(out, f"training: {start_epoch - 1} of {args.epochs} epochs done")
    if start_epoch > args.epochs:
        print(f"{args.resume} already finished all {args.epochs} epochs: nothing to train")

    def checkpoint(epoch):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "best_acc": best_acc, "args": vars(args), "classes": list(classes),
                "history": history, "lrs": lrs}

    epoch = done = start_epoch - 1  # done: the last epoch in last.pt
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            set_epoch(train_loader, args.seed, epoch, ddp.rank)
            desc = f"epoch {epoch}/{args.epochs}"
            with tqdm(train_loader, desc=f"{desc} train", leave=False, dynamic_ncols=True,
                      disable=not main_proc) as bar:
                def show(running, bar=bar):
                    bar.set_postfix(loss=f"{running['loss']:.3f}", acc=f"{running['acc']:.1f}%",
                                    lr=f"{running['lr']:.4f}")
                tr = train_one_epoch(train_net, bar, criterion, optimizer, scheduler, scaler, device,
                                     precision, channels_last, log=show, log_interval=args.log_interval,
                                     lr_log=lrs)
            dist_utils.broadcast_buffers(model)  # every process evaluates the model rank 0 saves
            te = evaluate(eval_net, tqdm(test_loader, desc=f"{desc} test", leave=False, dynamic_ncols=True,
                                         disable=not main_proc),
                          device, precision, channels_last, tta=args.tta)
            row = {"epoch": epoch, "lr": tr["lr"], "train_loss": tr["loss"], "train_acc": tr["acc"],
                   "test_loss": te["loss"], "test_acc": te["acc"],
                   "test_acc_single": te["single_acc"], "seconds": tr["seconds"] + te["seconds"]}
            history.append(row)
            is_best = te["acc"] > best_acc
            best_acc = max(best_acc, te["acc"])
            if main_proc:
                run_io.write_csv(out / "metrics.csv", history, METRIC_COLUMNS)
                state = checkpoint(epoch)
                run_io.save_checkpoint(out / "last.pt", state)
                if is_best:
                    run_io.save_checkpoint(out / "best.pt", state)
                write_report(out, f"training: {epoch} of {args.epochs} epochs done")
            done = epoch
            single = f" (single view {te['single_acc']:.2f}%)" if args.tta else ""
            print(f"{desc} | lr {tr['lr']:.4g} | train loss {tr['loss']:.4f} acc {tr['acc']:.2f}% | "
                  f"test loss {te['loss']:.4f} acc {te['acc']:.2f}%{' (best)' if is_best else ''}"
                  f"{single} | "
                  f"{row['seconds']:.1f}s ({tr['images_per_s']:.0f} img/s train)", flush=True)
    except KeyboardInterrupt:
        where = f"after epoch {done}" if done >= start_epoch else "before the first epoch ended"
        print(f"\ninterrupted {where}: continue with --resume {out / 'last.pt'}", file=sys.stderr)
        if main_proc:
            write_report(out, f"interrupted {where}: continue with --resume {out / 'last.pt'}")
        return 130

    agreement = ""
    if ddp.enabled:  # DDP keeps replicas equal by construction; check it, bit for bit
        digests = dist_utils.gather_digests(model)
        same = len(set(digests)) == 1
        agreement = (f"DDP: the {ddp.world_size} processes' weights and buffers are "
                     f"{'identical' if same else 'DIFFERENT'} (sha256 {', '.join(d[:12] for d in digests)})\n")
        if not same:
            print(f"error: {agreement}", file=sys.stderr)
            return 1
    if not main_proc:
        return 0
    if ddp.enabled:  # the galleries need every test image in one process
        test_loader = build_loader(args, test_split, device, train=False)
    if history:
        save_figure(plot_curves(history), out / "curves.png")
        save_figure(lr_figure(lrs, len(train_loader)), out / "lr.png")
        final = history[-1]
        views = (f" (flip TTA; single view {final['test_acc_single']:.2f}%)"
                 if args.tta and "test_acc_single" in final else "")
        result = (f"final test accuracy {final['test_acc']:.2f}%{views} | best {best_acc:.2f}% | "
                  f"{sum(r['seconds'] for r in history):.0f}s of epochs\n") + agreement
        result += write_analysis(model, test_split, test_loader, args, out, device, precision,
                                 channels_last)
        run_io.write_text(out / "summary.txt", table + found + setup + "\n" + result)
        write_report(out)
        print(result + f"run folder: {out}", end="\n")
    return 0


def write_analysis(model, split, loader, args, out, device, precision, channels_last) -> str:
    """Per-class accuracy, confusion matrix and the two galleries of the final model.

    Returns the per-class table for summary.txt. The galleries show the
    ``--gallery-size`` worst mistakes on the test set (lowest probability of the
    true class first, as fastai's plot_top_losses), de-normalised from the
    tensors the model saw. Predictions use the test-time flip when ``--tta`` is
    on, as the accuracy does; Grad-CAM explains the unflipped image.
    """
    classes = split.classes
    probs = predict(model, loader, device, precision, channels_last, args.tta).numpy()  # (N, K)
    preds = probs.argmax(1)
    matrix = confusion_matrix(split.labels, preds, len(classes))
    rows = per_class(matrix, classes)
    run_io.write_csv(out / "per_class.csv", rows, ["class", "correct", "total", "accuracy"])
    save_figure(confusion_figure(matrix, classes), out / "confusion.png")
    table = "per-class test accuracy (final model):\n" + "".join(
        f"  {r['class']:<12} {r['accuracy']:6.2f}% ({r['correct']}/{r['total']})\n" for r in rows)
    if args.gallery_size == 0:
        return table

    idx = top_losses(probs, split.labels, args.gallery_size)
    true, pred = split.labels[idx], preds[idx]
    conf, true_prob = probs[idx, pred], probs[idx, true]
    run_io.write_csv(out / "misclassified.csv",
                     [{"rank": r, "index": int(i), "true": classes[t], "predicted": classes[p],
                       "confidence": f"{c:.4f}", "true_prob": f"{tp:.4f}"}
                      for r, (i, t, p, c, tp) in enumerate(zip(idx, true, pred, conf, true_prob,
                                                               strict=True), 1)],
                     ["rank", "index", "true", "predicted", "confidence", "true_prob"])
    note = (f"the {len(idx)} worst of {int((preds != split.labels).sum())} mistakes "
            "(lowest probability of the true class first)")
    shown, titles, tiles, labels = [], [], [], []
    if len(idx):
        transform = test_transform()
        batch = torch.stack([transform(image=split.images[i])["image"] for i in idx])
        shown = [to_uint8_image(x) for x in batch]  # de-normalised: what the model saw
        titles = [f"pred {classes[p]} ({c:.0%})\ntrue {classes[t]} ({tp:.0%})"
                  for t, p, c, tp in zip(true, pred, conf, true_prob, strict=True)]
        with gradcam.GradCAM(model, args.gradcam_layer) as cam:
            maps_pred = cam(batch, pred)
            maps_true = cam(batch, true)
        for k, image in enumerate(shown):
            tiles += [image, gradcam.overlay(image, maps_pred[k]), gradcam.overlay(image, maps_true[k])]
            labels += [f"true {classes[true[k]]}\npred {classes[pred[k]]} ({conf[k]:.0%})",
                       f"CAM of pred\n{classes[pred[k]]}", f"CAM of true\n{classes[true[k]]}"]
    save_figure(image_grid(shown, titles, ncols=5, suptitle=note), out / "misclassified.png")
    save_figure(image_grid(tiles, labels, ncols=9,
                           suptitle=f"Grad-CAM at {args.gradcam_layer}: each image, then the map of "
                                    "the predicted class, then of the true class"),
                out / "gradcam.png")
    return table


def analyze(args) -> int:
    """Describe the data in the run folder: counts, samples, sizes, channel statistics."""
    out = check_out_dir(args, None)
    train_split, test_split = load_data(args.data_dir)
    classes = train_split.classes
    counts = {"train": class_counts(train_split.labels, len(classes)),
              "test": class_counts(test_split.labels, len(classes))}
    sizes = image_sizes(args.data_dir, (train_split, test_split))
    mean, std = channel_stats(train_split.images)

    rng = np.random.default_rng(args.seed)
    picks = [rng.choice(np.flatnonzero(train_split.labels == c), min(10, counts["train"][c]), replace=False)
             for c in range(len(classes))]
    images = [train_split.images[i] for idx in picks for i in idx]
    titles = [classes[c] if k == 0 else "" for c, idx in enumerate(picks) for k in range(len(idx))]

    source = "image folder" if any((Path(args.data_dir) / s).is_dir() for s in ("train", "test")) \
        else "torchvision CIFAR-10"
    width = max(len(c) for c in classes + ["total"])
    lines = [f"data: {args.data_dir} ({source}), {len(classes)} classes",
             f"{'class':<{width}}  {'train':>7}  {'test':>7}"]
    lines += [f"{name:<{width}}  {counts['train'][c]:>7}  {counts['test'][c]:>7}"
              for c, name in enumerate(classes)]
    lines.append(f"{'total':<{width}}  {counts['train'].sum():>7}  {counts['test'].sum():>7}")
    for split, counter in sizes.items():
        common = ", ".join(f"{w}x{h}: {n}" for (w, h), n in counter.most_common(5))
        more = f" (+{len(counter) - 5} more sizes)" if len(counter) > 5 else ""
        lines.append(f"{split} image sizes (width x height): {common}{more}")
    lines.append(f"the loaders resize every image to 32x32\n"
                 f"per-channel statistics of the {len(train_split.labels)} training images "
                 f"(pixels in [0, 1]), beside the constants the loaders normalise with (utils/cifar.py):")
    lines.append(f"{'channel':<8} {'mean':>7} {'loaders':>8} {'std':>7} {'loaders':>8}")
    lines += [f"{ch:<8} {mean[i]:7.4f} {MEAN[i]:8.4f} {std[i]:7.4f} {STD[i]:8.4f}"
              for i, ch in enumerate(("red", "green", "blue"))]
    text = "\n".join(lines) + "\n"

    make_out_dir(out)
    run_io.write_json(out / "args.json", vars(args))
    run_io.write_text(out / "analysis.txt", text)
    save_figure(class_counts_figure(counts, classes), out / "class_counts.png")
    save_figure(image_grid(images, titles, ncols=10,
                           suptitle="up to 10 random training images per class, one class per row"),
                out / "samples.png")
    save_figure(image_sizes_figure(sizes), out / "image_sizes.png")
    write_report(out)
    print(text + f"run folder: {out}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    status = 1
    try:
        args = resolve_args(build_parser().parse_args(argv))
        args.command = "python main.py " + shlex.join(argv)
        if args.analyze:
            return analyze(args)
        # under torchrun, only rank 0 prints (pytorch/examples and nanoGPT guard each print instead)
        quiet = int(os.environ.get("RANK", 0)) != 0
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull if quiet else sys.stdout):
            status = train(args)
            return status
    except (CLIError, DataError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the epoch loop, which reports its own checkpoint
        print("\ninterrupted before training started", file=sys.stderr)
        return 130
    finally:
        dist_utils.cleanup(wait=status == 0)  # a failed process must not wait for the others


if __name__ == "__main__":
    sys.exit(main())
