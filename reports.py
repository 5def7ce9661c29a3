"""Pictures and the test report: training curves, the confusion matrix, one prediction's
sanity-check plot, and a JSON report of the test-set results.

    from reports import plot_training_curves, test_report, summarize_report, save_test_report
    plot_training_curves(history, "runs/x/curves.png")       # history: one dict per epoch
    report = test_report(labels, predictions, class_names)
    print(summarize_report(report))
    save_test_report(report, "runs/x/test_report.json")
    plot_confusion_matrix(labels, predictions, class_names, "runs/x/confusion.png")
    plot_prediction(image, top_names, top_probabilities, "prediction.png")
    plot_mistakes(paths, labels, probabilities, class_names, "runs/x/mistakes.png")

matplotlib is imported only inside the plotting functions, so predict.py starts fast.
"""
import math
from pathlib import Path

import numpy as np

from common import atomic_write, write_json

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


def _class_indices(labels, predictions, class_count):
    """labels and predictions as checked integer arrays (tensors, lists and arrays all work)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    if labels.size == 0:
        raise ValueError("no images to report on")
    for name, values in (("label", labels), ("prediction", predictions)):
        if values.min() < 0 or values.max() >= class_count:
            raise ValueError(f"a {name} is outside 0..{class_count - 1} "
                             f"({class_count} class names)")
    return labels, predictions


def confusion_counts(labels, predictions, class_count):
    """counts[true, predicted] = how many images of class `true` were predicted as `predicted`."""
    labels, predictions = _class_indices(labels, predictions, class_count)
    flat = np.bincount(labels * class_count + predictions, minlength=class_count * class_count)
    return flat.reshape(class_count, class_count)


# --- training curves ------------------------------------------------------------------------

def plot_training_curves(history, path):
    """Loss (left) and validation accuracy (right) per epoch, the best epoch marked."""
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
    _plot_accuracy(accuracy_axes, epochs, [100 * row["valid_accuracy"] for row in history])
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        axes.grid(alpha=0.3)
    minutes = sum(row["seconds"] for row in history) / 60
    figure.suptitle(f"{len(history)} epoch{'s' if len(history) != 1 else ''}, "
                    f"{minutes:.1f} min of training")
    figure.tight_layout()
    _save_figure(figure, path)


def _plot_accuracy(axes, epochs, percents):
    """Validation accuracy in percent, with a dot and a label on the best (earliest on ties) epoch.

    The label goes above the dot, where the curve never is (the dot is its maximum).
    """
    best = int(np.argmax(percents))
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
    axes.set_ylim(max(0.0, low - 0.1 * span), high + 0.3 * span)     # headroom for the label
    axes.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    axes.legend(loc="best")


# --- the test report -------------------------------------------------------------------------

def test_report(labels, predictions, class_names, top_confusions=10, calibration=None):
    """Overall accuracy, each class's recall (share of its images named right) and precision
    (share of the images named it that are it; None when none were), their mean recall (what an
    unbalanced test set's accuracy hides), and the most frequent mix-ups, as a JSON-ready dict;
    calibration: calibration_section() of the same images, reported as it is."""
    counts = confusion_counts(labels, predictions, len(class_names))
    images = int(counts.sum())
    predicted = counts.sum(axis=0)
    per_class = [
        {"class_index": index, "name": str(class_names[index]), "images": int(row.sum()),
         "correct": int(row[index]), "recall": float(row[index] / row.sum()),
         "precision": float(row[index] / predicted[index]) if predicted[index] else None}
        for index, row in enumerate(counts) if row.sum() > 0]
    per_class.sort(key=lambda entry: (entry["recall"], entry["name"]))
    off_diagonal = counts.copy()
    np.fill_diagonal(off_diagonal, 0)
    confused = [{"true": str(class_names[true]), "predicted": str(class_names[predicted]),
                 "count": int(off_diagonal[true, predicted])}
                for true, predicted in zip(*np.nonzero(off_diagonal))]
    confused.sort(key=lambda pair: (-pair["count"], pair["true"], pair["predicted"]))
    report = {"accuracy": float(np.trace(counts) / images), "images": images,
              "mean_recall": float(np.mean([entry["recall"] for entry in per_class])),
              "per_class": per_class, "confused_pairs": confused[:top_confusions]}
    if calibration is not None:
        report["calibration"] = calibration
    return report


def calibration_section(logits, labels, temperature, unknown_share=None):
    """How well the confidence matches the accuracy: the expected calibration error (ECE) of
    softmax(logits) before and after dividing by the temperature, and the share of these
    images the unknown verdict flags (None: no verdict). logits, labels: tensors."""
    from calibration import ECE_BINS, expected_calibration_error  # torch: not at import time

    section = {"temperature": float(temperature), "ece_bins": ECE_BINS,
               "ece_before": expected_calibration_error(logits.softmax(1), labels),
               "ece_after": expected_calibration_error((logits / temperature).softmax(1), labels)}
    if unknown_share is not None:
        section["flagged_unknown"] = float(unknown_share)
    return section


test_report.__test__ = False    # its name starts with "test": keep pytest from collecting it


def summarize_report(report, lines=5):
    """A few terminal lines: overall accuracy, the worst classes, the most frequent mix-ups."""
    correct = sum(entry["correct"] for entry in report["per_class"])
    text = [f"test accuracy {100 * report['accuracy']:.2f}% ({correct}/{report['images']} images); "
            f"mean per-class recall {100 * report['mean_recall']:.2f}%"]
    calibration = report.get("calibration")
    if calibration:
        text.append(f"calibration error {100 * calibration['ece_before']:.1f}% -> "
                    f"{100 * calibration['ece_after']:.1f}% with temperature "
                    f"{calibration['temperature']:.2f}" + (
                        f"; {100 * calibration['flagged_unknown']:.1f}% flagged as unknown"
                        if "flagged_unknown" in calibration else ""))
    worst = [entry for entry in report["per_class"] if entry["correct"] < entry["images"]][:lines]
    if worst:
        text.append("worst classes:")
        text += [f"  {entry['name']}: recall {100 * entry['recall']:.1f}% "
                 f"({entry['correct']}/{entry['images']})" for entry in worst]
    else:
        text.append("every class perfectly classified")
    if report["confused_pairs"][:lines]:
        text.append("most confused (true -> predicted):")
        text += [f"  {pair['true']} -> {pair['predicted']}: {pair['count']}"
                 for pair in report["confused_pairs"][:lines]]
    return "\n".join(text)


def save_test_report(report, path):
    """The report as indented JSON, written atomically so a crash never leaves half a file."""
    write_json(report, path)


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


# --- contact sheets: thumbnails with captions --------------------------------------------------

def short_path(path, keep=2):
    """The last folders and the file name: enough to find the file below the data folder."""
    return "/".join(Path(path).parts[-keep:])


def contact_sheet(items, path, title, thumb=150, columns=6, caption_lines=3):
    """Thumbnails in a grid, each with its caption, as one PNG (PIL only: fast, no figure)."""
    from PIL import Image, ImageDraw, ImageFont

    from data_utils import UNREADABLE_IMAGE_ERRORS, load_image  # torch: not at import time

    font = ImageFont.load_default(size=11)
    line = 14
    cell_height = thumb + 6 + line * caption_lines
    rows = math.ceil(len(items) / columns)
    sheet = Image.new("RGB", (columns * (thumb + 10) + 10, 30 + rows * (cell_height + 10)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 8), title, fill="black", font=ImageFont.load_default(size=14))
    for index, (image_path, caption) in enumerate(items):
        x = 10 + (index % columns) * (thumb + 10)
        y = 30 + (index // columns) * (cell_height + 10)
        try:
            image = load_image(image_path, thumb)
            image.thumbnail((thumb, thumb))
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        except UNREADABLE_IMAGE_ERRORS:
            draw.rectangle((x, y, x + thumb, y + thumb), fill="#dddddd")
            draw.text((x + 10, y + thumb // 2), "cannot be read", fill="black", font=font)
        for number, text in enumerate(caption[:caption_lines]):
            draw.text((x, y + thumb + 4 + number * line), fit_text(draw, text, font, thumb + 8),
                      fill="black", font=font)
    atomic_write(path, lambda temporary: sheet.save(temporary, format="PNG", compress_level=1))
    return path


def fit_text(draw, text, font, width):
    """text, cut from the left with '...' until it fits width pixels (file names end in what
    tells them apart)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text

# --- the mistakes to review -----------------------------------------------------------------

def plot_mistakes(paths, labels, probabilities, class_names, path, limit=60):
    """mistakes.png: the wrongly named photos, worst first (lowest probability of the true
    class: fastai's top losses), each with its true name, the predicted name and probability.
    Returns how many photos were wrong; with none, nothing is written."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(paths), len(class_names)) or labels.size != len(paths):
        raise ValueError(f"{len(paths)} paths, {labels.size} labels and probabilities of shape "
                         f"{probabilities.shape} for {len(class_names)} classes do not match")
    predictions = probabilities.argmax(1)
    true_probability = probabilities[np.arange(len(labels)), labels]
    worst = mistakes_worst_first(labels, probabilities)
    if not worst.size:
        return 0
    items = [(paths[i], [f"true: {class_names[labels[i]]} ({100 * true_probability[i]:.0f}%)",
                         f"predicted: {class_names[predictions[i]]} "
                         f"({100 * probabilities[i, predictions[i]]:.0f}%)", short_path(paths[i])])
             for i in worst[:limit]]
    contact_sheet(items, path, f"{worst.size} of {len(paths)} photos wrongly named, worst first"
                  + (f" (first {limit} shown)" if worst.size > limit else ""))
    return int(worst.size)


def mistakes_worst_first(labels, probabilities):
    """Indices of the wrongly predicted images, lowest probability of the true class first."""
    wrong = np.nonzero(probabilities.argmax(1) != labels)[0]
    true_probability = probabilities[wrong, labels[wrong]]
    return wrong[np.argsort(true_probability, kind="stable")]
