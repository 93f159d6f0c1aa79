"""Measure training and evaluation speed, the data pipeline, and a plain reference loop.

    python bench.py                                  # both models, the device main.py would pick
    python bench.py --model custom_resnet --batch-size 512 --device cuda --compile
    python bench.py --data-dir DIR --workers 0 2       # DIR: an image folder (train/<class>/*)

For each model: training images/s of our step (``utils.engine.train_one_epoch``, the
loop main.py runs, with its precision and memory format) and evaluation images/s
(``utils.engine.evaluate``, one view), then the same model and batch in a plain
reference loop (fp32, NCHW, per-batch ``.item()``: the kuangliu/pytorch-cifar style),
reported as a ratio. Inputs are synthetic and already in memory, so these are
compute rates. Warm-up windows are excluded, each rate is the median of
``--windows`` timed windows of ``--steps`` batches, and GPU work is timed after
``torch.cuda.synchronize()``. Our windows and the reference's take turns, and the
ratio is the median of the ratios of neighbouring windows, so a machine whose speed
drifts (a shared VM's can drift by 2x within minutes) slows both sides alike.
With ``--data-dir``, the data pipeline is timed on real image files:
Albumentations transforms plus collation, per worker count
(workers 0 = in the main process), and the ``--gpu-aug`` batched path on the device.
With ``--real-epoch`` as well, each model also trains one real epoch through
``python main.py`` (the whole image folder, decoded, augmented by the loader's workers,
then evaluated with the test-time flip), and that epoch's training images per second
of wall time are set against the same run's reference compute rate.
Prints a table; ``--json PATH`` also writes the results as JSON.
"""
import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from model import MODELS, NORMS
from utils.cpu_conv import use_cpu_convs
from utils.cli import DEVICES, Parser, int_at_least, run_command
from utils.data import (DataError, _class_dirs, _image_files, load_data, make_loader, read_images,
                        train_transform)
from utils.device import (PRECISIONS, choose_precision, configure_backends, resolve_device, synchronize,
                          use_channels_last)
from utils.dist import Dist
from utils.engine import evaluate, train_one_epoch
from utils.errors import UserError
from utils.gpu_aug import DeviceLoader
from utils.profile import profile_window, summary_line
from utils.step import make_step


def timed_windows(runs: dict, device, warmup: int, windows: int) -> dict:
    """Seconds of each timed window per entry of ``runs`` (name -> callable), after ``warmup`` untimed rounds.

    The entries take turns, window by window, so that all of them see the same
    machine: a shared or throttled CPU drifts by up to 2x within minutes.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds = {name: [] for name in runs}
    for _ in range(windows):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def synthetic_batches(steps, batch_size, device, pin):
    """``steps`` distinct (images, labels) batches, normalised-looking, held in memory."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        images = torch.randn(batch_size, 3, 32, 32, generator=g)
        labels = torch.randint(0, 10, (batch_size,), generator=g)
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        batches.append((images, labels))
    return batches


def reference_train(model, batches, device):
    """The plain loop of kuangliu/pytorch-cifar's main.py: fp32, NCHW, an .item() per batch."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def window():
        train_loss, correct, total = 0.0, 0, 0
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, targets)
            loss.backward()
            optimizer.step()
            train_loss += loss.item()
            _, predicted = outputs.max(1)
            total += targets.size(0)
            correct += predicted.eq(targets).sum().item()
    return window


def reference_eval(model, batches, device):
    model.eval()

    @torch.no_grad()
    def window():
        correct = 0
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            correct += model(inputs).max(1)[1].eq(targets).sum().item()
    return window


def bench_model(args, name, device) -> dict:
    precision = choose_precision(device, args.precision)
    channels_last = use_channels_last(device, args.channels_last, args.norm)
    batches = synthetic_batches(args.steps, args.batch_size, device, pin=device.type == "cuda")
    n = args.steps * args.batch_size

    torch.manual_seed(0)
    model = MODELS[name](norm=args.norm).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cpu_convs = {}
    if device.type == "cpu" and precision.dtype == torch.bfloat16:  # as main.py does
        cpu_convs = use_cpu_convs(model, args.small_map_gemm, args.fp32_weight_grads)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # constant: speed only
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    scaler = precision.grad_scaler()
    step_args = argparse.Namespace(cuda_graph=args.cuda_graph, compile=args.compile, optimizer="sgd")
    step = make_step(step_args, step_model, criterion, optimizer, scaler, precision, device, Dist())
    ours = {
        "train": lambda: train_one_epoch(step_model, batches, criterion, optimizer, scheduler, scaler,
                                         device, precision, channels_last, step=step),
        "eval": lambda: evaluate(step_model, batches, device, precision, channels_last, tta=False),
    }
    torch.manual_seed(0)
    ref = MODELS[name](norm=args.norm).to(device)
    reference = {"train": reference_train, "eval": reference_eval}
    rates, speedups = {}, {}
    for phase in ("train", "eval"):
        secs = timed_windows({"ours": ours[phase], "ref": reference[phase](ref, batches, device)},
                             device, args.warmup, args.windows)
        rates[phase] = n / statistics.median(secs["ours"])
        rates[f"reference_{phase}"] = n / statistics.median(secs["ref"])
        # the ratio of each pair of neighbouring windows, so that a drift in machine speed cancels
        speedups[phase] = statistics.median(r / o for o, r in zip(secs["ours"], secs["ref"], strict=True))
    row = {"model": name, "norm": args.norm, "precision": precision.name,
            "memory_format": "channels_last" if channels_last else "NCHW", "compile": args.compile,
            "step": step.name,
            "small_map_gemm": bool(cpu_convs.get("small_map_gemm")),
            "fp32_weight_grads": bool(cpu_convs.get("fp32_weight_grads")),
            "train_images_per_s": rates["train"], "eval_images_per_s": rates["eval"],
            "reference_train_images_per_s": rates["reference_train"],
            "reference_eval_images_per_s": rates["reference_eval"],
            "train_speedup": speedups["train"], "eval_speedup": speedups["eval"]}
    if args.profile:  # one more window of our training step, traced
        row["profile"] = profile_window(ours["train"], device, Path(args.profile) / f"{name}-train.json")
    return row


def first_images(data_dir, n: int) -> np.ndarray:
    """The first ``n`` training images of an image folder, taken round-robin over the classes."""
    train = Path(data_dir) / "train"
    if not train.is_dir():
        raise DataError(f"{train} is missing: --data-dir needs an image folder with train/<class>/*")
    per_class = [_image_files(d) for d in _class_dirs(train)]
    files = [f for group in zip(*per_class, strict=False) for f in group][:n]
    return read_images(files)


def bench_data(args, device) -> list:
    """Images/s of the Albumentations pipeline (decoded images in memory, as main.py holds them)."""
    images = first_images(args.data_dir, args.data_images)
    labels = np.zeros(len(images), dtype=np.int64)
    from utils.data import Split
    split = Split(images, labels, ["x"])
    rows = []
    for workers in args.workers:
        loader = make_loader(split, train_transform(), args.batch_size, train=True, workers=workers)
        rates = []
        for _ in range(args.windows):
            start = time.perf_counter()
            seen = sum(len(y) for _, y in loader)  # worker start-up included, as in an epoch
            rates.append(seen / (time.perf_counter() - start))
        rate = statistics.median(rates)
        rows.append({"pipeline": "albumentations", "workers": workers, "images_per_s": rate,
                     "images_per_s_per_worker": rate / max(workers, 1)})
    loader = DeviceLoader(images, labels, args.batch_size, device, train=True)

    def window():
        for _batch in loader:
            pass
    secs = timed_windows({"gpu-aug": window}, device, 1, args.windows)["gpu-aug"]
    rows.append({"pipeline": f"gpu-aug on {device.type}", "workers": 0,
                 "images_per_s": len(images) / statistics.median(secs),
                 "images_per_s_per_worker": len(images) / statistics.median(secs)})
    return rows


def bench_real_epoch(args, row, images, decode_seconds) -> dict:
    """One epoch of ``main.py`` on ``--data-dir`` for ``row``'s model, against its reference rate.

    ``epoch_seconds`` is main.py's own figure (training plus the test pass, after the
    data is decoded); ``with_decode`` adds the one-off decoding that a run pays before
    its first epoch, as a one-epoch run would see it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--model", row["model"], "--norm", args.norm, "--data-dir", str(args.data_dir),
                "--epochs", "1", "--batch-size", str(args.batch_size), "--device", args.device,
                "--out-dir", str(Path(tmp) / "run"), "--gallery-size", "0",
                "--precision", args.precision,
                "--channels-last" if args.channels_last else "--no-channels-last"]
        argv += ["--compile"] * args.compile + ["--fp32-weight-grads"] * args.fp32_weight_grads
        argv += [] if args.cuda_graph is None else ["--cuda-graph" if args.cuda_graph else "--no-cuda-graph"]
        argv += ["--small-map-gemm" if args.small_map_gemm else "--no-small-map-gemm"]
        argv += ["--workers", str(args.epoch_workers)] if args.epoch_workers is not None else []
        start = time.perf_counter()
        # the real command, in its own process, as a user runs it (its printout stays out of the table)
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("main.py")), *argv],
                              capture_output=True, text=True)
        command_seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise UserError(f"main.py {' '.join(argv)} failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[-300:]}")
        with open(Path(tmp) / "run" / "metrics.csv", newline="") as f:
            (epoch,) = csv.DictReader(f)
        args_json = json.loads((Path(tmp) / "run" / "args.json").read_text())
    seconds = float(epoch["seconds"])
    rate, rate_with_decode = images / seconds, images / (seconds + decode_seconds)
    reference = row["reference_train_images_per_s"]
    return {"model": row["model"], "train_images": images, "workers": args_json["workers"],
            "epoch_seconds": seconds, "decode_seconds": decode_seconds, "command_seconds": command_seconds,
            "images_per_s": rate, "speedup": rate / reference,
            "images_per_s_with_decode": rate_with_decode, "speedup_with_decode": rate_with_decode / reference,
            "test_acc": float(epoch["test_acc"])}


def build_parser():
    p = Parser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to time")
    p.add_argument("--norm", default="bn", choices=NORMS, help="normalisation layer of resnet18")
    p.add_argument("--device", default="auto", choices=DEVICES, help="device")
    p.add_argument("--batch-size", type=int_at_least(1), default=128, help="images per batch")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="our step's precision (auto: bf16 where fast, as main.py)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="our step's channels_last memory format (as main.py)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (not the reference)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="our step captured in a CUDA graph (default: on with CUDA, as main.py)")
    p.add_argument("--small-map-gemm", action=argparse.BooleanOptionalAction, default=True,
                   help="our step on a bf16 CPU: 4x4 convolutions as one matrix multiply (main.py's flag)")
    p.add_argument("--fp32-weight-grads", action="store_true",
                   help="our step on a bf16 CPU: square convolutions' weight gradients in fp32 (main.py's flag)")
    p.add_argument("--steps", type=int_at_least(1), default=10, help="batches per timed window")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed windows first")
    p.add_argument("--windows", type=int_at_least(1), default=5, help="timed windows; the median is reported")
    p.add_argument("--data-dir", default=None,
                   help="image folder (train/<class>/*) to time the data pipeline on; none skips it")
    p.add_argument("--data-images", type=int_at_least(1), default=5120, help="images read for the data pipeline")
    p.add_argument("--workers", type=int_at_least(0), nargs="+", default=[0, 2], help="loader worker counts to time")
    p.add_argument("--real-epoch", action="store_true",
                   help="also train one real epoch of main.py per model on --data-dir (the whole folder) "
                        "and compare it with the reference's compute rate")
    p.add_argument("--epoch-workers", type=int_at_least(0), default=None,
                   help="loader workers of the real epoch (default: main.py's)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace one window of our training step per model with torch.profiler: "
                        "DIR/<model>-train.json (open in chrome://tracing or Perfetto) and a summary line "
                        "(GPU busy time, launches a step, the costliest kernels)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    return p


def print_table(models: list, data: list, epochs: list, steps: int) -> None:
    """The results as a table: our step against the reference, the data pipeline, real epochs."""
    print(f"{'model':<15}{'precision':<15}{'format':<15}{'step':<12}{'train img/s':>12}{'reference':>11}"
          f"{'ratio':>7}{'eval img/s':>12}{'reference':>11}{'ratio':>7}")
    for r in models:
        print(f"{r['model']:<15}{r['precision']:<15}{r['memory_format']:<15}{r['step'][:11]:<12}"
              f"{r['train_images_per_s']:>12.0f}{r['reference_train_images_per_s']:>11.0f}"
              f"{r['train_speedup']:>6.2f}x{r['eval_images_per_s']:>12.0f}"
              f"{r['reference_eval_images_per_s']:>11.0f}{r['eval_speedup']:>6.2f}x")
    print("reference: fp32, NCHW, .item() every batch (kuangliu/pytorch-cifar); "
          "ratio: median over neighbouring windows")
    for r in models:
        if "profile" in r:
            print(summary_line(f"{r['model']} train", r["profile"], steps))
    for r in data:
        print(f"data: {r['pipeline']:<22} workers {r['workers']}: {r['images_per_s']:.0f} img/s "
              f"({r['images_per_s_per_worker']:.0f} per worker)")
    for r in epochs:
        print(f"real epoch: {r['model']} {r['train_images']} images, workers {r['workers']}: "
              f"{r['epoch_seconds']:.0f} s (train + test with flip) = {r['images_per_s']:.0f} img/s, "
              f"{r['speedup']:.2f}x the reference; with the {r['decode_seconds']:.0f} s of decoding "
              f"{r['images_per_s_with_decode']:.0f} img/s, {r['speedup_with_decode']:.2f}x")


def bench(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.real_epoch and not args.data_dir:
        raise UserError("--real-epoch trains on an image folder: pass --data-dir too")
    if args.profile:
        try:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--profile {args.profile}: cannot create the folder ({exc.strerror}): "
                            "pass a writable path") from None
    device = resolve_device(args.device)
    configure_backends(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({gpu}) | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"batch {args.batch_size} | {args.steps} batches x median of {args.windows} windows "
          f"after {args.warmup} warm-up", flush=True)
    models = [bench_model(args, name, device) for name in args.model]
    data = bench_data(args, device) if args.data_dir else []
    epochs = []
    if args.real_epoch:
        start = time.perf_counter()
        train = load_data(args.data_dir, download=False)[0]  # what main.py decodes before epoch 1
        decode_seconds = time.perf_counter() - start
        epochs = [bench_real_epoch(args, row, len(train.labels), decode_seconds) for row in models]
    print_table(models, data, epochs, args.steps)
    result = {"device": str(device), "device_name": gpu, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "batch_size": args.batch_size, "steps": args.steps,
              "windows": args.windows, "warmup": args.warmup, "models": models, "data": data,
              "real_epochs": epochs}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    return run_command(bench, argv)


if __name__ == "__main__":
    sys.exit(main())
