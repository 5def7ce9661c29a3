"""Pictures: training curves, the confusion matrix and one prediction's sanity-check plot.

    from flower_classifier.reports.plots import plot_training_curves, plot_confusion_matrix
    plot_training_curves(history, "runs/x/training_curves.png")
    plot_confusion_matrix(labels, predictions, class_names, "runs/x/confusion_matrix.png")
    plot_prediction(image, top_names, top_probabilities, "prediction.png")

matplotlib is imported only inside the plotting functions, so predict.py starts fast.
"""
from pathlib import Path

import numpy as np

from flower_classifier.reports.test_report import confusion_counts
from flower_classifier.utils.files import atomic_write

DPI = 120
CONFUSION_DPI = 130
CONFUSION_INCHES_PER_CLASS = 0.16


def _pyplot():
    """pyplot on the non-interactive Agg backend (no display here, and none needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path, dpi=DPI):
    """Save as PNG atomically (the temporary name ends in .tmp, hence format=); free the figure."""
    path = Path(path)
    try:
        atomic_write(path, lambda temporary: figure.savefig(
            temporary, format="png", dpi=dpi, bbox_inches="tight", facecolor="white"))
    finally:
        _pyplot().close(figure)


# --- training curves ------------------------------------------------------------------------

def epoch_rank(metrics):
    """What makes an epoch better than another: higher validation accuracy, then lower
    validation loss (a history row, or a checkpoint's metrics)."""
    return metrics["valid_accuracy"], -metrics["valid_loss"]


def best_epoch(history):
    """The best epoch's number by epoch_rank, the earliest on a full tie: the one the Trainer
    keeps in the checkpoint and the training curves mark."""
    return max(history, key=epoch_rank)["epoch"]


def plot_training_curves(history, path):
    """Loss (left) and validation accuracy (right) per epoch, the best epoch (best_epoch, the
    checkpoint's) marked."""
    if not history:
        raise ValueError("no epochs to plot")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    loss_axes.plot(epochs, [row["train_loss"] for row in history], "o-", label="training")
    loss_axes.plot(epochs, [row["valid_loss"] for row in history], "o-", label="validation")
    loss_axes.set(title="loss", xlabel="epoch", ylabel="cross-entropy loss")
    loss_axes.legend()
    _plot_accuracy(accuracy_axes, epochs, [100 * row["valid_accuracy"] for row in history],
                   epochs.index(best_epoch(history)))
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        axes.grid(alpha=0.3)
    minutes = sum(row["seconds"] for row in history) / 60
    figure.suptitle(f"{len(history)} epoch{'s' if len(history) != 1 else ''}, "
                    f"{minutes:.1f} min of training")
    figure.tight_layout()
    _save_figure(figure, path)


def _plot_accuracy(axes, epochs, percents, best):
    """Validation accuracy in percent, with a dot and a label on epochs[best], the best epoch.

    The label goes above the dot, where the curve never is (the dot is its maximum). The axis
    ends at 100%, with the headroom for the label inside it.
    """
    axes.plot(epochs, percents, "o-", color="tab:green", label="validation")
    axes.plot(epochs[best], percents[best], "o", color="tab:red", markersize=10, zorder=3,
              label="best epoch")
    where = best / (len(epochs) - 1) if len(epochs) > 1 else 0.5
    align = "left" if where < 0.25 else "right" if where > 0.75 else "center"
    axes.annotate(f"best: {percents[best]:.1f}% (epoch {epochs[best]})",
                  (epochs[best], percents[best]), xytext=(0, 14), textcoords="offset points",
                  ha=align, va="bottom", fontweight="bold", color="tab:red",
                  bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "tab:red"})
    low, high = min(percents), max(percents)
    span = max(high - low, 4.0)
    axes.set_ylim(max(0.0, low - 0.1 * span), min(100.0, high + 0.3 * span))  # room for the label
    axes.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    axes.legend(loc="best")


# --- confusion matrix -----------------------------------------------------------------------

def plot_confusion_matrix(labels, predictions, class_names, path):
    """Row-normalised confusion matrix, sized so that 102 class names stay readable."""
    plt = _pyplot()
    from matplotlib.colors import PowerNorm

    class_count = len(class_names)
    counts = confusion_counts(labels, predictions, class_count)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = counts / counts.sum(axis=1, keepdims=True)   # NaN rows: no test images
    side = max(6.0, CONFUSION_INCHES_PER_CLASS * class_count)
    figure, axes = plt.subplots(figsize=(side + 1.2, side))
    colormap = plt.get_cmap("Blues").with_extremes(bad="#dddddd")
    # A square-root scale keeps the rare mix-ups visible next to a near-1 diagonal.
    norm = PowerNorm(gamma=0.5 if class_count > 40 else 1.0, vmin=0, vmax=1)
    image = axes.imshow(np.ma.masked_invalid(fractions), cmap=colormap, norm=norm,
                        interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    colorbar.set_label("fraction of the true class's images")
    font_size = 6 if class_count > 40 else 9
    ticks = np.arange(class_count)
    axes.set_xticks(ticks, [str(name) for name in class_names], rotation=90, fontsize=font_size)
    axes.set_yticks(ticks, [str(name) for name in class_names], fontsize=font_size)
    # Faint cell borders, to follow a row or column from its name to a mix-up far off the diagonal.
    # (Two line collections: a minor tick and grid line per class took a third of the time.)
    borders = ticks[:-1] + 0.5
    for draw_lines in (axes.hlines, axes.vlines):
        draw_lines(borders, -0.5, class_count - 0.5, color="#888888", linewidth=0.3, alpha=0.3)
    if class_count <= 20:
        _write_counts(axes, counts, fractions)
    axes.set_xlabel("predicted class", fontsize=11)
    axes.set_ylabel("true class", fontsize=11)
    accuracy = np.trace(counts) / counts.sum()
    axes.set_title(f"confusion matrix (rows normalised): test accuracy {100 * accuracy:.2f}% "
                   f"({np.trace(counts)}/{counts.sum()} images)", fontsize=12)
    _save_figure(figure, path, dpi=CONFUSION_DPI)


def _write_counts(axes, counts, fractions):
    """Image counts in the non-empty cells; only for few classes, where they fit."""
    for true, predicted in zip(*np.nonzero(counts)):
        dark = fractions[true, predicted] > 0.5
        axes.text(predicted, true, str(counts[true, predicted]), ha="center", va="center",
                  fontsize=8, color="white" if dark else "black")


# --- one prediction --------------------------------------------------------------------------

def plot_prediction(image, names, probabilities, path, title=None):
    """The input image above a bar chart of the top-K classes: the assignment's sanity check.

    The title defaults to the most likely name; the bars are sorted, most likely on top.
    """
    probabilities = np.asarray(probabilities, dtype=float).reshape(-1)
    if len(names) != probabilities.size or not len(names):
        raise ValueError(f"need as many names as probabilities (at least one), got "
                         f"{len(names)} and {probabilities.size}")
    order = np.argsort(-probabilities, kind="stable")
    names = [str(names[index]) for index in order]
    probabilities = probabilities[order]
    plt = _pyplot()
    pixels = np.asarray(image.convert("RGB"))
    width = 5.0
    image_height = min(width * pixels.shape[0] / pixels.shape[1], 6.0)
    bars_height = 0.45 * len(names) + 0.8
    figure = plt.figure(figsize=(width, image_height + bars_height + 0.5), layout="constrained")
    # Two subfigures, so the image may use the full width instead of lining up with the bars,
    # whose names take the left part of theirs.
    image_figure, bars_figure = figure.subfigures(2, 1, height_ratios=[image_height + 0.4,
                                                                     bars_height])
    image_axes = image_figure.subplots()
    image_axes.imshow(pixels)
    image_axes.axis("off")
    image_axes.set_title(title or names[0], fontsize=13)
    _plot_top_k(bars_figure.subplots(), names, probabilities)
    _save_figure(figure, path)


def _plot_top_k(axes, names, probabilities):
    """Horizontal bars, most likely on top, each labelled with its probability in percent."""
    positions = np.arange(len(names))
    bars = axes.barh(positions, probabilities, color="tab:blue")
    bars[0].set_color("tab:orange")
    axes.set_yticks(positions, names, fontsize=10)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("probability")
    for position, probability in zip(positions, probabilities):
        inside = probability > 0.8          # near 1 the label would run off the right edge
        axes.text(probability - 0.01 if inside else probability + 0.01, position,
                  f"{100 * probability:.1f}%", va="center", ha="right" if inside else "left",
                  fontsize=9, color="white" if inside else "black")
    axes.grid(axis="x", alpha=0.3)
