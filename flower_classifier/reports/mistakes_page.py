"""mistakes.html: the wrongly named photos as one page, worst first, each with its true and
predicted names and probabilities, the file it came from and the heatmap of where the model
looked. The photos are inside the page, so it opens anywhere (another machine,
a mail); mistakes.png stays, the same photos as one picture.

    write_mistakes_page(paths, labels, probabilities, class_names, "runs/x/mistakes.html",
                        heatmap=lambda path: png_bytes)   # optional
"""
import base64
import html
import io
from pathlib import Path

import numpy as np

from flower_classifier.reports.contact_sheets import mistakes_worst_first
from flower_classifier.utils.files import atomic_write

THUMBNAIL = 224
STYLE = """body{font-family:sans-serif;margin:1em;background:#fafafa}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:6px;width:460px}
figure img{width:224px;height:224px;object-fit:contain;background:#eee}
figcaption{font-size:14px;line-height:1.4;word-break:break-all}
.true{color:#064}.predicted{color:#a00}.missing{display:inline-block;width:224px;height:224px;
background:#ddd;text-align:center;line-height:224px}"""


def data_uri(data, mime):
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_jpeg(path, side=THUMBNAIL):
    """JPEG bytes of the photo made to fit side x side, or None where it cannot be read."""
    from flower_classifier.data.images import UNREADABLE_IMAGE_ERRORS, load_image

    try:
        image = load_image(path, side)
    except UNREADABLE_IMAGE_ERRORS:
        return None
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def picture(data, mime, alt):
    if data is None:
        return f'<span class="missing">{html.escape(alt)}</span>'
    return f'<img src="{data_uri(data, mime)}" alt="{html.escape(alt)}">'


def mistake_figure(path, true_line, predicted_line, heatmap):
    """One mistake: the photo and its heatmap (where heatmap(path) is given and the photo can be
    read), the two names, the file as a link."""
    path = Path(path).absolute()
    thumbnail = thumbnail_jpeg(path)
    pictures = picture(thumbnail, "image/jpeg", "cannot be read")
    if heatmap is not None and thumbnail is not None:
        pictures += picture(heatmap(path), "image/png", "heatmap")
    return (f"<figure>{pictures}<figcaption>"
            f'<span class="true">true: {html.escape(true_line)}</span><br>'
            f'<span class="predicted">predicted: {html.escape(predicted_line)}</span><br>'
            f'<a href="{html.escape(path.as_uri())}">{html.escape(str(path))}</a>'
            "</figcaption></figure>")


def write_mistakes_page(paths, labels, probabilities, class_names, path, heatmap=None,
                        limit=60):
    """Write the page of the wrongly named photos (the first `limit`, worst first: the lowest
    probability of the true class); heatmap(photo path) -> PNG bytes draws where the model
    looked. Returns how many were wrong; with none, nothing is written."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    worst = mistakes_worst_first(labels, probabilities)
    if not worst.size:
        return 0
    figures = []
    for index in worst[:limit]:
        predicted = probabilities[index].argmax()
        figures.append(mistake_figure(
            paths[index],
            f"{class_names[labels[index]]} ({probabilities[index, labels[index]]:.0%})",
            f"{class_names[predicted]} ({probabilities[index, predicted]:.0%})",
            heatmap))
    title = (f"{worst.size} of {len(labels)} photos wrongly named, worst first"
             + (f" (first {limit} shown)" if worst.size > limit else ""))
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width"><title>{html.escape(title)}'
            f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            "<p>true: the photo's class (the probability the model gave it); predicted: the "
            "model's answer (its probability); the heatmap: where the model looked for its "
            f'answer, red most.</p><div class="grid">{"".join(figures)}</div></body></html>\n')
    atomic_write(path, lambda temporary: Path(temporary).write_text(page, encoding="utf-8"))
    return int(worst.size)
