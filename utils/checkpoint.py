"""The one checkpoint schema: what a run saves, how it is read back and checked.

A checkpoint is a dict of tensors and plain Python values, so it loads with
``weights_only=True`` (opening it cannot run code), written whole or not at
all (a temporary file, then a rename). It holds everything a run needs to
continue and everything inference needs to preprocess as training did:

    model, optimizer, scheduler, scaler   state dicts (the unwrapped model)
    epoch, best_acc, history, lrs         progress: last epoch done, its rows, every lr used
    args                                  the run's resolved arguments
    classes                               class names, in label order
    preprocess                            {"image_size": 32, "mean": [...], "std": [...]}
    steps_per_epoch                       optimizer steps an epoch took
    versions                              {"torch": ..., "torchvision": ...} that wrote it

``load_trained(path)`` gives a model ready for inference with its classes and
preprocessing; ``resume_args`` decides what a resumed run may change.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from model import MODELS

from .cifar import IMAGE_SIZE, MEAN, STD
from .errors import UserError
from .io import atomic_write

KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_acc", "args", "history", "lrs",
        "classes", "preprocess", "steps_per_epoch", "versions")
# Written by every version of main.py; the rest were added later and get the values those runs used.
REQUIRED = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_acc", "args", "history")
# Flags that change a run's mathematics: a resumed run must keep them (the data folder is
# checked through the steps per epoch it gives).
MATH_FLAGS = ("model", "norm", "epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov",
              "weight_decay", "label_smoothing", "scheduler", "peak_epoch", "div_factor", "annihilate",
              "cutout_p", "train_subset", "test_subset", "val_split", "seed")
# Never taken from the checkpoint: they describe this invocation, not the run.
NOT_INHERITED = ("resume", "out_dir", "command", "lr_find", "analyze", "cuda_graph")


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or does not fit what is asked of it."""


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs: resized to ``image_size``, scaled to [0, 1], normalised."""

    image_size: int = IMAGE_SIZE
    mean: tuple = MEAN
    std: tuple = STD

    def transform(self):
        """The Albumentations pipeline uint8 (H, W, 3) -> normalised (3, H, W), as at test time."""
        from .images import test_transform
        return test_transform(self.mean, self.std)

    def to_tensor(self, images) -> torch.Tensor:
        """uint8 (H, W, 3) or (N, H, W, 3) RGB at ``image_size`` -> normalised (N, 3, H, W) float32.

        Through the very transform the run's test loader used, so the values are identical.
        """
        images = np.asarray(images, dtype=np.uint8)
        images = images[None] if images.ndim == 3 else images
        transform = self.transform()
        if not len(images):
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.stack([transform(image=image)["image"] for image in images])

    def as_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


@dataclass
class Trained:
    """A trained model in eval mode with what inference needs to use it correctly."""

    model: nn.Module
    classes: list
    preprocess: Preprocess
    args: dict
    epoch: int
    best_acc: float
    path: Path


def versions() -> dict:
    import torchvision
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)}


def build_state(*, model, optimizer, scheduler, scaler, epoch, best_acc, args, history, lrs, classes,
                steps_per_epoch, preprocess=Preprocess()) -> dict:
    """A checkpoint dict in the one schema; ``model`` is the plain (unwrapped) module."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "best_acc": best_acc, "args": dict(args), "history": list(history), "lrs": list(lrs),
            "classes": list(classes), "preprocess": preprocess.as_dict(),
            "steps_per_epoch": steps_per_epoch, "versions": versions()}


def save(path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: the old file stays whole until the new one is."""
    atomic_write(path, lambda f: torch.save(state, f))


def load(path, device="cpu", flag: str = "--checkpoint") -> dict:
    """Read and check a checkpoint (``weights_only=True``); CheckpointError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path} does not exist: pass the last.pt or best.pt of a run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        _validate(ckpt)
    except Exception as exc:  # unpickling, a foreign file, a dict of another shape: one message
        reason = str(exc).splitlines()[0][:120] if isinstance(exc, _SchemaError) else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({reason}): "
                              "pass a last.pt or best.pt written by main.py") from None
    ckpt.setdefault("lrs", [])
    ckpt.setdefault("classes", [])
    ckpt.setdefault("preprocess", Preprocess().as_dict())  # every earlier run used these constants
    ckpt.setdefault("steps_per_epoch", None)
    ckpt.setdefault("versions", {})
    return ckpt


class _SchemaError(ValueError):
    pass


def _validate(ckpt) -> None:
    if not isinstance(ckpt, dict):
        raise _SchemaError(f"a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise _SchemaError(f"no {', '.join(missing)}")
    args = ckpt["args"]
    if not isinstance(args, dict) or not {"model", "norm"} <= set(args):
        raise _SchemaError("its args name no model and norm")
    if args["model"] not in MODELS:
        raise _SchemaError(f"model {args['model']!r} is not one of {', '.join(MODELS)}")
    if not isinstance(ckpt["model"], dict):
        raise _SchemaError("its model entry is not a state dict")


def preprocess_of(ckpt: dict) -> Preprocess:
    p = ckpt["preprocess"]
    return Preprocess(int(p["image_size"]), tuple(p["mean"]), tuple(p["std"]))


def build_model(ckpt: dict, path, num_classes: int | None = None) -> nn.Module:
    """The checkpoint's model with its weights, on the CPU; CheckpointError if they do not fit."""
    name, norm = ckpt["args"]["model"], ckpt["args"]["norm"]
    num_classes = num_classes or len(ckpt["classes"]) or _head_size(ckpt["model"])
    model = MODELS[name](num_classes=num_classes, norm=norm)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} is {name} (norm {norm}) but its weights do not fit "
                              f"{num_classes} classes ({str(exc).splitlines()[0]}): pass a checkpoint "
                              "written by main.py for this data") from None
    return model


def _head_size(state: dict) -> int:
    """Outputs of the last linear layer: the class count of a checkpoint that names no classes."""
    return [v for v in state.values() if getattr(v, "ndim", 0) == 2][-1].shape[0]


def load_trained(path, device="cpu") -> Trained:
    """The model of a main.py checkpoint in eval mode on ``device``, with its classes and preprocessing."""
    ckpt = load(path)
    model = build_model(ckpt, path).to(device).eval()
    classes = list(ckpt["classes"]) or [str(k) for k in range(_head_size(ckpt["model"]))]
    return Trained(model, classes, preprocess_of(ckpt), dict(ckpt["args"]), int(ckpt["epoch"]),
                   float(ckpt["best_acc"]), Path(path))


def resume_args(ckpt: dict, args, given: set, names: dict, path) -> None:
    """Make ``args`` the checkpoint's run again, in place.

    Every flag not given on the command line takes the checkpoint's value. A
    flag given explicitly that changes the run's mathematics (``MATH_FLAGS``)
    and differs from the checkpoint is refused, all such flags in one message;
    the others (device, workers, log interval, ...) may change.
    """
    saved = ckpt["args"]
    clashes = [f"{names.get(k, k)} {getattr(args, k)!r} (checkpoint: {saved[k]!r})"
               for k in MATH_FLAGS if k in given and k in saved and getattr(args, k) != saved[k]]
    if clashes:
        raise CheckpointError(f"checkpoint {path} was trained with other settings: {'; '.join(clashes)}: "
                              "drop these flags to continue the run, or start a new run without --resume")
    for key, value in saved.items():
        if key not in given and key not in NOT_INHERITED and hasattr(args, key):
            setattr(args, key, value)
    if "precision" not in saved and saved.get("amp") is False and "precision" not in given:
        args.precision = "fp32"  # a run saved before --precision replaced --no-amp


def check_steps(ckpt: dict, steps_per_epoch: int, args) -> None:
    """The data must give the run the steps per epoch it was trained with."""
    saved = ckpt.get("steps_per_epoch")
    if saved is not None and saved != steps_per_epoch:
        raise CheckpointError(f"--data-dir {args.data_dir} gives {steps_per_epoch} steps per epoch, but "
                              f"checkpoint {args.resume} was trained with {saved}: resume on the data "
                              "the run was trained on")
