"""Contact sheets: photos a person should look at, as thumbnails with captions in one PNG.

    from flower_classifier.reports.contact_sheets import contact_sheet, plot_mistakes
    contact_sheet([("a.jpg", ["filed: rose", "a.jpg"])], "sheet.png", "likely mislabelled",
                  legend="filed: the photo's class folder")
    plot_mistakes(paths, labels, probabilities, class_names, "runs/x/mistakes.png")
"""
import math
from pathlib import Path

import numpy as np

from flower_classifier.utils.files import atomic_write


MISTAKES_LEGEND = ("true: the photo's class (the probability the model gave it); predicted: "
                   "the model's answer (its probability)")


def short_path(path, keep=2):
    """The last folders and the file name: enough to find the file below the data folder."""
    return "/".join(Path(path).parts[-keep:])


def contact_sheet(items, path, title, thumb=150, columns=6, caption_lines=3, legend=None,
                  max_label_width=250):
    """Thumbnails in a grid, each with its caption, as one PNG (PIL only: fast, no figure).

    A caption's last line is the photo's file path: a long one is cut from the left (the file
    name tells photos apart); the lines above it are labels: the cells widen (up to
    max_label_width pixels) so that they stay whole, and one longer still is cut from the
    right, keeping the number in brackets at its end. legend: a line under the title saying
    what the numbers in the captions mean."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    line = 14
    labels = [font.getlength(text) for _, caption in items for text in caption[:-1]]
    width = int(min(max([thumb + 8, *labels]), max_label_width))
    cell_height = thumb + 6 + line * caption_lines
    top = 30 + (18 if legend else 0)
    rows = math.ceil(len(items) / columns)
    sheet = Image.new("RGB", (columns * (width + 10) + 10, top + rows * (cell_height + 10)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 8), title, fill="black", font=ImageFont.load_default(size=14))
    if legend:
        draw.text((10, 28), fit_text(draw, legend, font, sheet.width - 20, cut="right"),
                  fill="#444444", font=font)
    for index, (image_path, caption) in enumerate(items):
        x = 10 + (index % columns) * (width + 10)
        y = top + (index // columns) * (cell_height + 10)
        _paste_thumbnail(sheet, draw, image_path, (x + (width - thumb) // 2, y), thumb, font)
        for number, text in enumerate(caption[:caption_lines]):
            cut = "left" if number == len(caption) - 1 else "right"
            draw.text((x, y + thumb + 4 + number * line),
                      fit_text(draw, text, font, width, cut=cut), fill="black", font=font)
    atomic_write(path, lambda temporary: sheet.save(temporary, format="PNG", compress_level=1))
    return path


def _paste_thumbnail(sheet, draw, image_path, corner, thumb, font):
    """The photo's thumbnail centred in its square at corner, or a grey square saying it cannot
    be read."""
    from flower_classifier.data.images import UNREADABLE_IMAGE_ERRORS, load_image

    x, y = corner
    try:
        image = load_image(image_path, thumb)
        image.thumbnail((thumb, thumb))
        sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
    except UNREADABLE_IMAGE_ERRORS:
        draw.rectangle((x, y, x + thumb, y + thumb), fill="#dddddd")
        draw.text((x + 10, y + thumb // 2), "cannot be read", fill="black", font=font)


def fit_text(draw, text, font, width, cut="left"):
    """text, cut with '...' until it fits width pixels. cut="left" drops its start (a file path:
    its end tells files apart); cut="right" drops the end of a label, but keeps a number in
    brackets that ends it ("suggested: canterbury b... (1.00)")."""
    if draw.textlength(text, font=font) <= width:
        return text
    if cut == "left":
        while text and draw.textlength("..." + text, font=font) > width:
            text = text[1:]
        return "..." + text
    head, bracket, number = text.rpartition(" (")
    suffix = bracket + number if head and number.endswith(")") else ""
    text = head if suffix else text
    while text and draw.textlength(text + "..." + suffix, font=font) > width:
        text = text[:-1]
    return text + "..." + suffix


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
                  + (f" (first {limit} shown)" if worst.size > limit else ""),
                  legend=MISTAKES_LEGEND)
    return int(worst.size)


def mistakes_worst_first(labels, probabilities):
    """Indices of the wrongly predicted images, lowest probability of the true class first."""
    wrong = np.nonzero(probabilities.argmax(1) != labels)[0]
    true_probability = probabilities[wrong, labels[wrong]]
    return wrong[np.argsort(true_probability, kind="stable")]
