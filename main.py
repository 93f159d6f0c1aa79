"""Train and test ResNet-18 (BN / GN / LN) or the custom ResNet on CIFAR-10 or any image folder.

    python main.py --model resnet18 --epochs 20
    python main.py --model resnet18 --norm gn --epochs 20
    python main.py --model custom_resnet --epochs 24
    python main.py --resume runs/X/last.pt          # continue an interrupted run

Every run writes a folder (``--out-dir``, default ``runs/<model>-<norm>-<time>``):
args.json, summary.txt, metrics.csv, last.pt and best.pt during training, report.html
after every epoch; then curves, the lr schedule, per-class accuracy, the confusion
matrix and the galleries of the final model (utils/run_folder.py lists them).
``--lr-find`` adds the LR range test; ``--analyze`` describes the data instead.
"""
import argparse
import contextlib
import os
import shlex
import sys

import torch.nn as nn
from tqdm import tqdm

from model import ADAM_LR, MODELS, NORMS
from utils import checkpoint, engine
from utils import dist as dist_utils
from utils.cli import DEVICES, Parser, float_in, given_flags, int_at_least, lr_or_auto, option_names
from utils.assess import assess
from utils.data import default_workers, set_max_image_pixels
from utils.describe import describe
from utils.device import PRECISIONS, choose_precision, configure_backends, resolve_device, use_channels_last
from utils.engine import NonFiniteLoss
from utils.errors import UserError
from utils.gradcam import METHODS
from utils.interpret import Interpretation, write_analysis
from utils.plots import lr_figure, plot_curves
from utils.run_folder import RunFolder
from utils.seed import seed_everything, set_epoch
from utils.signals import as_stop, exit_status, sigterm_as_interrupt
from utils.step import make_step
from utils.training import (Progress, build_loader, build_model, build_optimizer, build_scheduler,
                            check_parallel, find_lr, load_splits, setup_line, use_gpu_aug, wrap)


def recipes(field: str) -> str:
    return ", ".join(f"{getattr(entry, field)} for {name}" for name, entry in MODELS.items())


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="main.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=list(MODELS), help="architecture")
    p.add_argument("--norm", default="bn", choices=NORMS,
                   help="normalisation: BatchNorm, GroupNorm (32 groups) or LayerNorm over (C,H,W)")
    p.add_argument("--epochs", type=int_at_least(0), default=None,
                   help=f"epochs (default: {recipes('epochs')}; 0 with --lr-find: run the range test only)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help=f"batch size (default: {recipes('batch_size')}); under torchrun "
                        "the global batch, split evenly over the processes, so a recipe keeps its "
                        "batch and learning rate on any number of GPUs")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="optimizer")
    g.add_argument("--max-lr", "--lr", dest="lr", type=lr_or_auto, default=None,
                   help="peak learning rate, or auto for the LR range test's suggestion "
                        f"(default: {recipes('lr')}; {ADAM_LR:g} with adam)")
    g.add_argument("--momentum", type=float_in(0, 1, high_open=True), default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="Nesterov momentum for SGD")
    g.add_argument("--weight-decay", type=float_in(0, 1), default=5e-4, help="L2 weight decay")
    g.add_argument("--label-smoothing", type=float_in(0, 1, high_open=True), default=0.1,
                   help="label smoothing of the training loss")
    g.add_argument("--scheduler", default="onecycle", choices=["onecycle", "cosine", "step"],
                   help="lr schedule, stepped every batch; step divides the lr by 10 at 50%% and 75%%")
    g.add_argument("--peak-epoch", type=float_in(0, 1e6, low_open=True), default=None,
                   help="One Cycle: epoch of the peak lr (default: 5 for 24 epochs, scaled to --epochs)")
    g.add_argument("--div-factor", type=float_in(1, 1e6), default=100.0,
                   help="One Cycle: starting (and final) lr = max lr / div-factor")
    g.add_argument("--annihilate", type=float_in(0, 1, high_open=True), nargs="?", const=0.1,
                   default=0.0, help="One Cycle: fraction of the steps (0.1 if given bare) in a third "
                                     "phase, from the starting lr down 100x further; 0: none")

    g = p.add_argument_group("LR range test (Smith 2017, via torch-lr-finder)")
    g.add_argument("--lr-find", action="store_true",
                   help="run the range test before training: lr_finder.png, suggested max and min lr")
    g.add_argument("--lr-find-start", type=float_in(0, 10, low_open=True), default=1e-7,
                   help="first lr of the exponential sweep")
    g.add_argument("--lr-find-end", type=float_in(0, 100, low_open=True), default=10.0,
                   help="last lr of the sweep")
    g.add_argument("--lr-find-iters", type=int_at_least(20), default=200,
                   help="training batches in the sweep (it stops early once the loss diverges)")

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="./data",
                   help="torchvision CIFAR-10 root (downloaded on first use), or a folder with "
                        "train/<class>/ and test/<class>/ images")
    g.add_argument("--train-subset", type=int_at_least(1), default=None,
                   help="train on a fixed class-balanced subset of N images")
    g.add_argument("--test-subset", type=int_at_least(1), default=None,
                   help="test on a fixed class-balanced subset of N images")
    g.add_argument("--val-split", type=int_at_least(1), default=None,
                   help="hold out N class-balanced training images (fixed by --seed) as a validation set: "
                        "best.pt is chosen on it and the test set is only measured; without it best.pt "
                        "is chosen on the test set")
    g.add_argument("--cutout-p", type=float_in(0, 1), default=0.5,
                   help="probability of the 8x8 cutout hole")
    g.add_argument("--analyze", action="store_true",
                   help="describe the data and train nothing: class counts, 10 samples per class, "
                        "image sizes, per-channel mean and std beside the loaders' constants")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="test-time flip: test accuracy averages the logits of each image and its "
                        "mirror image; the single-view accuracy is logged beside it")
    g.add_argument("--workers", type=int_at_least(0), default=default_workers(),
                   help="data loader worker processes")
    g.add_argument("--max-image-pixels", type=int_at_least(1), default=89_478_485,
                   help="refuse image files with more pixels than this (Pillow's decompression-bomb limit)")

    g = p.add_argument_group("hardware and reproducibility")
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto picks cuda, then mps, then cpu")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on CUDA GPUs and CPUs with native bf16, fp16 autocast with "
                        "loss scaling on older GPUs (T4, V100), fp32 elsewhere; or force one")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format where it is faster (CUDA, CPU)")
    g.add_argument("--seed", type=int, default=1, help="seed for Python, NumPy, torch and the loaders")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only, for bit-for-bit repeatable runs")

    g = p.add_argument_group("speed (README, \"Speed\")")
    g.add_argument("--gpu-aug", action=argparse.BooleanOptionalAction, default=None,
                   help="hold the data on the training device as uint8 and augment whole batches there "
                        "(same pad-crop, flip and cutout) instead of in --workers (default: on with CUDA, "
                        "where loader workers cannot keep up with the step, unless the data would take over "
                        "a quarter of the free GPU memory; off elsewhere)")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the training step (forward, backward, SGD, lr, running sums) in a CUDA "
                        "graph and replay it: the GPU stops waiting on Python (default: on with CUDA, "
                        "except under torchrun, --compile, Adam and fp16)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (its first epoch pays the compile time)")
    g.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="let cuDNN time its convolution algorithms once and keep the fastest (CUDA)")
    g.add_argument("--persistent-workers", action=argparse.BooleanOptionalAction, default=None,
                   help="keep loader workers alive between epochs (default: on with CUDA; they then "
                        "continue their augmentation streams instead of reseeding every epoch)")
    g.add_argument("--prefetch", type=int_at_least(1), default=4,
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
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue the run of a last.pt: its model, data, optimizer, schedule and seed "
                        "come from the checkpoint; flags that would change them are refused")
    g.add_argument("--log-interval", type=int_at_least(1), default=20,
                   help="batches between progress-bar updates")
    g.add_argument("--gallery-size", type=int_at_least(0), default=25,
                   help="misclassified test images in misclassified.png and gradcam.png (0: none)")
    g.add_argument("--gradcam-layer", default=None,
                   help=f"dotted name of the Grad-CAM layer (default: {recipes('cam_layer')}; 8x8 maps, "
                        "see gradcam.py)")
    g.add_argument("--cam-method", default="gradcam", choices=METHODS,
                   help="CAM method of the gallery (gradcam.png)")

    g = p.add_argument_group("assessing the final model (README, \"Results you can trust\")")
    g.add_argument("--robustness", action="store_true",
                   help="also test on CIFAR-10-C-style corrupted copies of the test set (noise, blur, JPEG, "
                        "brightness, contrast; 5 severities each, made locally and fixed by --seed)")
    g.add_argument("--robustness-subset", type=int_at_least(1), default=None,
                   help="corrupt a fixed class-balanced subset of N test images; None: all of them")
    g.add_argument("--faithfulness", type=int_at_least(0), default=0, metavar="N",
                   help="score every CAM method's faithfulness on N test images: the drop of the class "
                        "probability when the pixels its map ranks highest are removed, against "
                        "removing random ones; 0: off")
    return p


def parse(argv) -> tuple:
    """(resolved arguments, the --resume checkpoint or None), checked before anything is written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.analyze and (args.resume or args.lr_find):
        raise UserError("--analyze only describes the data: run it without --resume and --lr-find")
    if args.resume and args.lr_find:
        raise UserError("--lr-find runs before training starts, not on a resumed run: drop --lr-find")
    resume = None
    if args.resume:
        resume = checkpoint.load(args.resume, flag="--resume")
        checkpoint.resume_args(resume, args, given_flags(parser, argv), option_names(parser), args.resume)
    args.command = "python main.py " + shlex.join(argv)
    set_max_image_pixels(args.max_image_pixels)
    return resolve_args(args), resume


def resolve_args(args) -> argparse.Namespace:
    """Fill the model's recipe defaults and check what argparse cannot check alone."""
    recipe = MODELS[args.model]
    args.epochs = recipe.epochs if args.epochs is None else args.epochs
    args.batch_size = args.batch_size or recipe.batch_size
    if args.lr is None:
        args.lr = ADAM_LR if args.optimizer == "adam" else recipe.lr
    if args.peak_epoch is None:
        args.peak_epoch = round(args.epochs * 5 / 24, 3)
    args.gradcam_layer = args.gradcam_layer or recipe.cam_layer
    if args.epochs == 0 and not args.lr_find:
        raise UserError("--epochs 0 trains nothing: pass --lr-find with it to run only the range "
                        "test, or at least 1 epoch")
    if args.lr_find_start >= args.lr_find_end:
        raise UserError(f"--lr-find-start {args.lr_find_start} must be below --lr-find-end "
                        f"{args.lr_find_end}: the sweep goes up")
    if args.epochs and args.scheduler == "onecycle" and args.peak_epoch >= args.epochs:
        raise UserError(f"--peak-epoch {args.peak_epoch} must be below --epochs {args.epochs}: "
                        "pass a smaller --peak-epoch")
    return args


def train(args, resume, run, ddp) -> int:
    """One run, start to finish: set-up, the epoch loop, the analysis of the final model."""
    device = resolve_device(args.device)
    check_parallel(args, ddp, device)
    device = dist_utils.init(ddp, device)
    seed_everything(args.seed, args.deterministic)
    configure_backends(device, args.cudnn_benchmark, args.deterministic)
    precision = choose_precision(device, args.precision)
    channels_last = use_channels_last(device, args.channels_last, args.norm)

    train_split, val_split, test_split = load_splits(args)
    args.gpu_aug = use_gpu_aug(args.gpu_aug, device, train_split, val_split, test_split)
    train_loader = build_loader(args, train_split, device, train=True, ddp=ddp)
    val_loader = None if val_split is None else build_loader(args, val_split, device, train=False, ddp=ddp)
    test_loader = build_loader(args, test_split, device, train=False, ddp=ddp)
    args.data = data_sizes(train_split, val_split, test_split)
    if resume is not None:
        checkpoint.check_steps(resume, len(train_loader), args)
    model, table, cpu_convs = build_model(args, len(train_split.classes), device, precision, channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    print(table, end="")
    found = (find_lr(args, model, criterion, train_loader, device, precision, channels_last, run)
             if args.lr_find or args.lr == "auto" else "")
    if args.epochs == 0:  # --lr-find --epochs 0: the range test alone
        run.start(args, table + found, "finished")
        print(f"run folder: {run.path}")
        return 0
    optimizer = build_optimizer(args, model, args.lr)
    scheduler = build_scheduler(args, optimizer, len(train_loader))
    scaler = precision.grad_scaler()
    progress = Progress.restore(resume, model, optimizer, scheduler, scaler)
    train_net, eval_net = wrap(model, args, ddp, device)
    step = make_step(args, train_net, criterion, optimizer, scaler, precision, device, ddp)
    setup = setup_line(args, device, precision, channels_last, cpu_convs, ddp, step.name)
    print(setup)
    header = table + found + setup + "\n"
    run.start(args, header, f"training: {progress.epoch} of {args.epochs} epochs done")
    run.saved_epoch = progress.epoch
    if progress.epoch >= args.epochs:
        print(f"{args.resume} already finished all {args.epochs} epochs: nothing to train")

    try:
        for epoch in range(progress.epoch + 1, args.epochs + 1):
            set_epoch(train_loader, args.seed, epoch, ddp.rank)
            desc = f"epoch {epoch}/{args.epochs}"
            with bar(train_loader, f"{desc} train", ddp.main) as batches:
                tr = engine.train_one_epoch(train_net, batches, criterion, optimizer, scheduler, scaler,
                                            device, precision, channels_last, log=postfix(batches),
                                            log_interval=args.log_interval, lr_log=progress.lrs, step=step)
            dist_utils.broadcast_buffers(model)  # every process evaluates the model rank 0 saves
            hardware = (eval_net, device, precision, channels_last, args, ddp.main)
            va = measure(val_loader, f"{desc} val", *hardware)  # None without --val-split
            te = measure(test_loader, f"{desc} test", *hardware)
            is_best = progress.record(epoch, tr, va, te)  # UserError on a non-finite loss
            state = checkpoint.build_state(model=model, optimizer=optimizer, scheduler=scheduler,
                                           scaler=scaler, **progress.state(), args=vars(args),
                                           classes=train_split.classes, steps_per_epoch=len(train_loader))
            run.end_epoch(state, progress.history, is_best, f"training: {epoch} of {args.epochs} epochs done")
            progress.epoch = epoch
            print(f"{desc} | {progress.line(tr, va, te, is_best, args.tta)}", flush=True)
    except NonFiniteLoss as exc:
        raise diverged(run, args, epoch, exc.step) from None
    except (KeyboardInterrupt, RuntimeError) as exc:  # Ctrl-C, or SIGTERM (utils/signals.py)
        if as_stop(exc) is None:
            raise
        return interrupted(run, as_stop(exc))

    same, agreement = dist_utils.check_replicas(model)
    if not same:
        print(f"error: {agreement}", file=sys.stderr)
        return 1
    if ddp.main and progress.history:
        if ddp.enabled:  # the galleries need every test image in one process
            test_loader = build_loader(args, test_split, device, train=False)
        interp = Interpretation.from_model(model, test_loader, test_split, device, precision,
                                           channels_last, args.tta)
        finish(run, args, progress, header + agreement, interp, test_split, model, len(train_loader),
               (device, precision, channels_last))
    return 0


def data_sizes(train, val, test) -> dict:
    """The data a run saw, recorded in args.json: compare.py refuses to compare runs on other data."""
    return {"classes": list(train.classes), "train": len(train.labels),
            "val": 0 if val is None else len(val.labels), "test": len(test.labels)}


def measure(loader, desc, net, device, precision, channels_last, args, show: bool):
    """engine.evaluate over one split with a progress bar; None when the split is absent."""
    if loader is None:
        return None
    with bar(loader, desc, show) as batches:
        return engine.evaluate(net, batches, device, precision, channels_last, tta=args.tta)


def bar(loader, desc: str, enabled: bool):
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not enabled)


def postfix(batches):
    """The progress bar's running loss, accuracy and lr (train_one_epoch's log callback)."""
    def log(running):
        batches.set_postfix(loss=f"{running['loss']:.3f}", acc=f"{running['acc']:.1f}%",
                            lr=f"{running['lr']:.4f}")
    return log


def interrupted(run, exc: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM: say which epoch last.pt holds and how to continue; exit status 130 or 143."""
    where = f"after epoch {run.saved_epoch}" if run.saved_epoch else "before the first epoch ended"
    how = "terminated (SIGTERM)" if exit_status(exc) == 143 else "interrupted"
    message = f"{how} {where}: continue with --resume {run / 'last.pt'}"
    print(f"\n{message}", file=sys.stderr)
    run.report(message)
    return exit_status(exc)


def diverged(run, args, epoch: int, step: int) -> UserError:
    """The error for a non-finite loss: where it happened, what last.pt holds, what to change."""
    kept = (f"last.pt holds epoch {run.saved_epoch}, the last finite one" if run.saved_epoch
            else "no checkpoint was written")
    message = (f"the training loss became non-finite (NaN or inf) at epoch {epoch}, step {step}; "
               f"{kept}: start a new run with a lower --max-lr than {args.lr:g}")
    run.report(f"stopped: {message}")
    return UserError(message)


def finish(run, args, progress, header, interp, split, model, steps_per_epoch, hardware) -> None:
    """Curves, the lr plot, per-class accuracy, galleries, the assessments, the summary, the report."""
    run.figure("curves.png", plot_curves(progress.history))
    run.figure("lr.png", lr_figure(progress.lrs, steps_per_epoch))
    result = progress.result(args.tta)
    result += write_analysis(run, interp, split, model, args.gradcam_layer, args.gallery_size, args.cam_method)
    result += assess(run, args, interp, split, model, *hardware, progress)
    run.write_text("summary.txt", header + result)
    run.report()
    print(result + f"run folder: {run.path}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    status = 1
    try:
        args, resume = parse(argv)
        ddp = dist_utils.from_env()
        # the run folder's lock is held until the run ends (utils/run_folder.py)
        with sigterm_as_interrupt(), RunFolder.check(args, resume is not None, ddp.main) as run:
            if args.analyze:
                print(describe(args, run) + f"run folder: {run.path}")
                return 0
            # under torchrun, only rank 0 prints (pytorch/examples and nanoGPT guard each print instead)
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if ddp.main else devnull):
                status = train(args, resume, run, ddp)
                return status
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # before the epoch loop, which reports its own checkpoint
        print("\ninterrupted before training started", file=sys.stderr)
        return exit_status(exc)
    finally:
        dist_utils.cleanup(wait=status == 0)  # a failed process must not wait for the others


if __name__ == "__main__":
    sys.exit(main())
