"""How far the final model can be trusted: calibration, robustness, faithfulness of its maps.

Called once after training (``main.py``); writes into the run folder

    reliability.png     the reliability diagram of the test set (utils/calibration.py)
    robustness.csv/png  accuracy on CIFAR-10-C-style corruptions (``--robustness``)
    faithfulness.csv/png  the CAM methods' faithfulness scores (``--faithfulness N``)
    results.json        the run's figures in one place, read by compare.py

and returns the lines for summary.txt.
"""

from model import MODELS

from .calibration import ECE_BINS, ece, reliability_figure
from .data import balanced_subset
from .gpu_aug import normalize, to_chw


def assess(run, args, interp, split, model, device, precision, channels_last, progress) -> str:
    """Every assessment the arguments ask for; results.json last, so it lists them all."""
    results = {**_accuracies(progress), "ece": ece(interp.probs, interp.labels, ECE_BINS), "ece_bins": ECE_BINS}
    run.figure("reliability.png", reliability_figure(interp.probs, interp.labels, ECE_BINS))
    views = "with the test-time flip" if args.tta else "single view"
    text = (f"expected calibration error (test set, final model, {views}, {ECE_BINS} equal-width "
            f"confidence bins): {100 * results['ece']:.2f}%\n")
    if args.robustness:
        rows, table = _robustness(run, args, split, model, device, precision, channels_last)
        results["robustness"] = rows
        text += table
    if args.faithfulness:
        rows, table = _faithfulness(run, args, split, model)
        results["faithfulness"] = rows
        text += table
    run.write_json("results.json", results)
    return text


def _accuracies(progress) -> dict:
    """Final and best.pt accuracies, and on which split best.pt was chosen."""
    final, best = progress.history[-1], progress.best_row()
    number = lambda v: None if v == "" else float(v)  # noqa: E731
    return {"best_on": progress.best_on, "best_epoch": best["epoch"],
            "best_val_acc": number(best.get("val_acc", "")), "best_test_acc": float(best["test_acc"]),
            "final_val_acc": number(final.get("val_acc", "")), "final_test_acc": float(final["test_acc"])}


def _robustness(run, args, split, model, device, precision, channels_last):
    from .corruptions import robustness, robustness_figure, robustness_table

    rows = robustness(model, split, device, precision, channels_last, args.tta, args.batch_size,
                      subset=args.robustness_subset, seed=args.seed)
    run.write_csv("robustness.csv", rows, list(rows[0]))
    run.figure("robustness.png", robustness_figure(rows))
    images = rows[0]["images"]
    return rows, (f"CIFAR-10-C-style robustness ({images} test images, corruptions made locally with seed "
                  f"{args.seed}; not the published CIFAR-10-C, not comparable with its mCE):\n"
                  + robustness_table(rows))


def faithfulness_inputs(split, n: int, seed: int):
    """The first ``n`` of a class-balanced, seed-fixed choice of test images, normalised as tested."""
    idx = balanced_subset(split.labels, min(n, len(split.labels)), seed)
    return normalize(to_chw(split.images[idx]))


def _faithfulness(run, args, split, model):
    from .faithfulness import faithfulness, faithfulness_table, most_faithful
    from .gradcam import METHODS
    from .plots import faithfulness_figure

    images = faithfulness_inputs(split, args.faithfulness, args.seed)
    layers = list(dict.fromkeys([args.gradcam_layer, MODELS[args.model].deep_layer]))
    rows = faithfulness(model, images, METHODS, layers, seed=args.seed)
    run.write_csv("faithfulness.csv", rows, list(rows[0]))
    run.figure("faithfulness.png", faithfulness_figure(rows))
    best = most_faithful(rows)
    return rows, (faithfulness_table(rows)
                  + "".join(f"  most faithful at {layer}: {method}\n" for layer, method in best.items()))
