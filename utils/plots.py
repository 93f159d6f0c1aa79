"""Figures drawn after training from the returned history, never inside the loop."""
import matplotlib

matplotlib.use("Agg")  # files only; no display needed (servers, CI, Colab's backend aside)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_curves(history: list, path) -> None:
    """Loss and accuracy per epoch, train and test, side by side."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split in ("train", "test"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], marker="o", label=split)
        ax_acc.plot(epochs, [r[f"{split}_acc"] for r in history], marker="o", label=split)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
