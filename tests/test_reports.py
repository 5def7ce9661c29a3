"""flower_classifier/reports: the test report's numbers on hand-made predictions, and that every plot writes a
readable PNG atomically (no temporary file left behind)."""
import base64
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flower_classifier.reports import contact_sheets, mistakes_page, plots, test_report

PROJECT_ROOT = Path(__file__).parents[1]
NAMES = ["alpha", "beta", "gamma", "delta"]            # delta never occurs in the labels
#            alpha: 4 images, 3 right      beta: 3 images, 1 right      gamma: 3, all right
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PREDICTIONS = [0, 0, 0, 1, 2, 2, 1, 2, 2, 2]


def history(epochs):
    return [{"epoch": epoch, "train_loss": 2.0 / epoch, "valid_loss": 2.2 / epoch,
             "valid_accuracy": 0.6 + 0.03 * epoch - (0.05 if epoch == epochs else 0),
             "seconds": 12.5} for epoch in range(1, epochs + 1)]


def strong_diagonal(class_count, images=1000, seed=0):
    """Random labels; 85% of predictions right, the rest random."""
    generator = np.random.default_rng(seed)
    labels = generator.integers(0, class_count, images)
    wrong = generator.random(images) < 0.15
    predictions = np.where(wrong, generator.integers(0, class_count, images), labels)
    return labels, predictions


def assert_png(path, min_width=200, min_height=200):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width >= min_width and image.height >= min_height
        size = image.size
    assert [p.name for p in path.parent.iterdir()] == [path.name], "temporary file left over"
    return size


def test_report_numbers_and_order():
    report = test_report.test_report(LABELS, PREDICTIONS, NAMES)

    assert report["images"] == 10
    assert report["accuracy"] == pytest.approx(0.7)
    assert [entry["name"] for entry in report["per_class"]] == ["beta", "alpha", "gamma"]
    beta, alpha, gamma = report["per_class"]
    assert beta == {"class_index": 1, "name": "beta", "images": 3, "correct": 1,
                    "recall": pytest.approx(1 / 3), "precision": 0.5}
    assert alpha == {"class_index": 0, "name": "alpha", "images": 4, "correct": 3,
                     "recall": pytest.approx(0.75), "precision": 1.0}
    assert gamma == {"class_index": 2, "name": "gamma", "images": 3, "correct": 3,
                     "recall": 1.0, "precision": 0.6}
    assert report["mean_recall"] == pytest.approx((1 / 3 + 0.75 + 1) / 3)
    assert report["confused_pairs"] == [{"true": "beta", "predicted": "gamma", "count": 2},
                                        {"true": "alpha", "predicted": "beta", "count": 1}]
    assert json.loads(json.dumps(report)) == report


def test_report_accepts_arrays_and_limits_confusions():
    report = test_report.test_report(np.array(LABELS), np.array(PREDICTIONS), NAMES, top_confusions=1)
    assert report["confused_pairs"] == [{"true": "beta", "predicted": "gamma", "count": 2}]
    assert all(type(entry["class_index"]) is int for entry in report["per_class"])


def test_report_ties_sorted_by_name_and_perfect_run_has_no_confusions():
    report = test_report.test_report([2, 0, 1], [2, 0, 1], ["c", "b", "a"])
    assert [entry["name"] for entry in report["per_class"]] == ["a", "b", "c"]
    assert report["confused_pairs"] == []
    assert report["accuracy"] == 1.0


@pytest.mark.parametrize("labels, predictions", [([0, 1], [0]), ([], []), ([0, 4], [0, 1])])
def test_report_rejects_bad_input(labels, predictions):
    with pytest.raises(ValueError):
        test_report.test_report(labels, predictions, NAMES)


def test_summarize_report():
    report = test_report.test_report(LABELS, PREDICTIONS, NAMES)
    text = test_report.summarize_report(report, lines=1)
    assert "test accuracy 70.00% (7/10 images); mean per-class recall 69.44%" in text
    assert "beta: recall 33.3% (1/3)" in text
    assert "alpha: recall 75.0%" not in text                     # only lines=1 worst class
    assert "beta -> gamma: 2" in text
    assert "alpha -> beta" not in text
    assert "gamma" not in test_report.summarize_report(report).split("most confused")[0]  # perfect


def test_report_with_calibration_section():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [4.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])  # 75% right, about 98% sure: overconfident
    section = test_report.calibration_section(logits, labels, temperature=4.0, unknown_share=0.25)
    assert section["ece_before"] == pytest.approx(0.982 - 0.75, abs=1e-3)
    assert section["ece_after"] < section["ece_before"]
    report = test_report.test_report(labels.tolist(), logits.argmax(1).tolist(), ["a", "b"],
                                 calibration=section)
    assert report["calibration"] == section
    assert "calibration error 23.2% -> " in test_report.summarize_report(report)
    assert "25.0% flagged as unknown" in test_report.summarize_report(report)
    assert "calibration" not in test_report.test_report(LABELS, PREDICTIONS, NAMES)


def test_save_test_report(tmp_path):
    report = test_report.test_report(LABELS, PREDICTIONS, NAMES)
    path = tmp_path / "test_report.json"
    test_report.save_test_report(report, path)
    assert json.loads(path.read_text()) == report
    assert "\n  " in path.read_text()                          # indented
    assert [p.name for p in tmp_path.iterdir()] == ["test_report.json"]


@pytest.mark.parametrize("epochs", [1, 10])
def test_plot_training_curves(tmp_path, epochs):
    path = tmp_path / "curves.png"
    plots.plot_training_curves(history(epochs), path)
    width, height = assert_png(path, min_width=800, min_height=350)
    assert width > height                                      # two panels side by side


def test_plot_confusion_matrix_grows_with_classes(tmp_path):
    sizes = {}
    for class_count in (5, 102):
        folder = tmp_path / str(class_count)
        folder.mkdir()
        labels, predictions = strong_diagonal(class_count)
        names = [f"flower number {index}" for index in range(class_count)]
        path = folder / "confusion.png"
        plots.plot_confusion_matrix(labels, predictions, names, path)
        sizes[class_count] = assert_png(path, min_width=500, min_height=500)
        assert path.stat().st_size < 5_000_000
    assert sizes[102][0] > 2 * sizes[5][0] and sizes[102][1] > 2 * sizes[5][1]


def test_plot_prediction(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 90, 3), np.uint8))
    path = tmp_path / "prediction.png"
    names = ["pink primrose", "a very long flower name indeed", "rose"]
    plots.plot_prediction(image, names, [0.91, 0.06, 0.03], path)
    width, height = assert_png(path, min_width=300, min_height=400)
    assert height > width                                      # image above the bars


def test_plot_prediction_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_prediction(Image.new("RGB", (8, 8)), ["a", "b"], [1.0], tmp_path / "p.png")


def test_import_stays_light():
    """predict.py's start-up: importing the reports must not pull in matplotlib or torch."""
    code = ("import sys, flower_classifier.reports.evaluation; "
            "print('matplotlib' in sys.modules, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_plot_prediction_sorts_unsorted_input(tmp_path):
    """Unsorted top-K must give the same picture as the sorted one (most likely on top)."""
    image = Image.new("RGB", (60, 40), (200, 50, 50))
    plots.plot_prediction(image, ["b", "a"], [0.2, 0.8], tmp_path / "unsorted.png")
    plots.plot_prediction(image, ["a", "b"], [0.8, 0.2], tmp_path / "sorted.png")
    with Image.open(tmp_path / "unsorted.png") as unsorted, \
            Image.open(tmp_path / "sorted.png") as expected:
        assert np.array_equal(np.asarray(unsorted), np.asarray(expected))


def test_mistakes_worst_first():
    labels = np.array([0, 1, 2, 0, 1])
    probabilities = np.array([[0.9, 0.05, 0.05],    # right
                              [0.6, 0.3, 0.1],      # wrong, true class at 0.3
                              [0.1, 0.85, 0.05],    # wrong, true class at 0.05: the worst
                              [0.2, 0.1, 0.7],      # wrong, true class at 0.2
                              [0.1, 0.8, 0.1]])     # right
    assert contact_sheets.mistakes_worst_first(labels, probabilities).tolist() == [2, 3, 1]


def test_plot_mistakes(tmp_path):
    photos = []
    for index, colour in enumerate(["red", "green", "blue"]):
        photos.append(tmp_path / f"photo_{index}.jpg")
        Image.new("RGB", (300, 200), colour).save(photos[-1])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    photos.append(tmp_path / "broken.jpg")
    probabilities = np.array([[0.7, 0.3], [0.2, 0.8], [0.9, 0.1], [0.4, 0.6]])
    path = tmp_path / "out" / "mistakes.png"
    wrong = contact_sheets.plot_mistakes(photos, [0, 0, 1, 0], probabilities, ["rose", "tulip"], path)
    assert wrong == 3                                 # a broken photo is drawn as a grey box
    assert_png(path, min_width=400, min_height=150)
    assert contact_sheets.plot_mistakes(photos[:1], [0], probabilities[:1], ["rose", "tulip"],
                                 tmp_path / "none.png") == 0
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(ValueError, match="do not match"):
        contact_sheets.plot_mistakes(photos, [0, 0], probabilities, ["rose", "tulip"], path)


def test_training_curves_mark_the_checkpoints_best_epoch_on_a_tie(tmp_path, monkeypatch):
    """Epochs 2 and 3 tie on accuracy; 3 has the lower loss, so the Trainer keeps epoch 3
    (plots.epoch_rank) and the plot marks epoch 3, not the earliest maximum. The accuracy axis
    ends at 100%."""
    rows = [{"epoch": epoch, "train_loss": 1.0, "valid_loss": loss, "valid_accuracy": accuracy,
             "seconds": 1.0} for epoch, loss, accuracy in [(1, 0.9, 0.9), (2, 0.5, 1.0),
                                                           (3, 0.4, 1.0)]]
    assert plots.best_epoch(rows) == 3
    assert plots.best_epoch(rows[:2] + [{**rows[2], "valid_loss": 0.5}]) == 2   # full tie
    figures = []
    monkeypatch.setattr(plots, "_save_figure", lambda figure, path, dpi=None: figures.append(
        figure))
    plots.plot_training_curves(rows, tmp_path / "curves.png")
    accuracy_axes = figures[0].axes[1]
    labels = [text.get_text() for text in accuracy_axes.texts]
    assert labels == ["best: 100.0% (epoch 3)"]
    assert accuracy_axes.get_ylim()[1] == 100.0


def drawn_texts(monkeypatch):
    """Every text a contact sheet draws, in order (PIL's ImageDraw.text, recorded)."""
    from PIL import ImageDraw

    texts, draw_text = [], ImageDraw.ImageDraw.text

    def record(self, xy, text, *args, **kwargs):
        texts.append(text)
        return draw_text(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    return texts


def test_contact_sheet_cuts_the_path_not_the_label_and_explains_the_numbers(tmp_path,
                                                                           monkeypatch):
    photo = tmp_path / "a_very_long_folder_name_for_photos" / "image_06734_of_the_flowers.jpg"
    photo.parent.mkdir()
    Image.new("RGB", (200, 150), "red").save(photo)
    texts = drawn_texts(monkeypatch)
    contact_sheets.contact_sheet(
        [(photo, ["filed: 96 (0.00)", "suggested: canterbury bells (1.00)", str(photo)])],
        tmp_path / "sheet.png", "likely mislabelled", legend="filed: the folder's class")
    title, legend, filed, suggested, path = texts
    assert (title, legend, filed) == ("likely mislabelled", "filed: the folder's class",
                                      "filed: 96 (0.00)")
    assert suggested == "suggested: canterbury bells (1.00)"   # the cell widens: whole
    assert path.startswith("...") and path.endswith("_of_the_flowers.jpg")
    from PIL import ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(Image.new("RGB", (10, 10))), ImageFont.load_default(size=11)
    long_label = "suggested: giant white arum lily and more words (0.97)"
    cut = contact_sheets.fit_text(draw, long_label, font, 158, cut="right")
    assert cut.startswith("suggested: giant") and cut.endswith("... (0.97)")
    assert draw.textlength(cut, font=font) <= 158


class PageParts(HTMLParser):
    """The figures of mistakes.html: each one's image sources, caption text and link."""

    def __init__(self):
        super().__init__()
        self.figures = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figures.append({"images": [], "text": "", "link": None})
        elif tag == "img" and self.figures:
            self.figures[-1]["images"].append(attrs["src"])
        elif tag == "a" and self.figures:
            self.figures[-1]["link"] = attrs["href"]

    def handle_data(self, data):
        if self.figures:
            self.figures[-1]["text"] += data


def test_mistakes_page_shows_the_wrong_photos_worst_first_with_heatmaps(tmp_path):
    photos = []
    for index, colour in enumerate(["red", "green", "blue", "white"]):
        photos.append(tmp_path / f"photo {index}.jpg")
        Image.new("RGB", (300, 200), colour).save(photos[-1])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    photos.append(tmp_path / "broken.jpg")
    probabilities = np.array([[0.7, 0.3], [0.2, 0.8], [0.9, 0.1], [0.45, 0.55], [0.05, 0.95]])
    asked = []

    def heatmap(path):
        asked.append(path)
        return b"\x89PNG heatmap of " + Path(path).name.encode()

    page = tmp_path / "out" / "mistakes.html"
    page.parent.mkdir()
    wrong = mistakes_page.write_mistakes_page(photos, [0, 0, 1, 0, 0], probabilities,
                                              ["<rose>", "tulip & co"], page, heatmap)
    assert wrong == 4 and list(page.parent.iterdir()) == [page]   # written whole, no temporary
    parser = PageParts()
    parser.feed(page.read_text(encoding="utf-8"))
    # worst first: the lowest probability of the true class (broken 0.05, photo 2 0.1, ...)
    order = [photos[index] for index in (4, 2, 1, 3)]
    assert [figure["link"] for figure in parser.figures] == [p.as_uri() for p in order]
    assert asked == order[1:]                     # a photo that cannot be read has no heatmap
    assert [len(figure["images"]) for figure in parser.figures] == [0, 2, 2, 2]
    assert "cannot be read" in parser.figures[0]["text"]
    second = parser.figures[1]
    assert second["images"][0].startswith("data:image/jpeg;base64,")
    assert base64.b64decode(second["images"][1].split(",")[1]) == b"\x89PNG heatmap of photo 2.jpg"
    assert "true: tulip & co (10%)" in second["text"]
    assert "predicted: <rose> (90%)" in second["text"]
    with Image.open(io.BytesIO(base64.b64decode(second["images"][0].split(",")[1]))) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == mistakes_page.THUMBNAIL
    assert "<rose>" not in page.read_text()                       # names are escaped
    assert mistakes_page.write_mistakes_page(photos[:1], [0], probabilities[:1], ["a", "b"],
                                             tmp_path / "none.html") == 0
    assert not (tmp_path / "none.html").exists()


def test_the_mistakes_and_data_check_sheets_have_a_legend_and_names(tmp_path, monkeypatch):
    from flower_classifier.datacheck.report import SHEET_LEGENDS, sheet_items

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (200, 150), "red").save(photo)
    texts = drawn_texts(monkeypatch)
    contact_sheets.plot_mistakes([photo], [0], np.array([[0.2, 0.8]]), ["rose", "tulip"],
                                 tmp_path / "mistakes.png")
    assert texts[1] == contact_sheets.MISTAKES_LEGEND and "probability" in texts[1]
    report = {"exact_duplicates": [], "near_duplicates": [], "tiny": [], "unreadable": [],
              "mislabelled": [{"path": str(photo), "class": "96", "self_confidence": 0.0,
                               "suggested": "97", "suggested_probability": 1.0}]}
    assert sheet_items(report, {"96": "camellia", "97": "clematis"})["mislabelled"][0][1][:2] \
        == ["filed: camellia (0.00)", "suggested: clematis (1.00)"]
    assert sheet_items(report)["mislabelled"][0][1][0] == "filed: 96 (0.00)"
    assert "r: the correlation" in SHEET_LEGENDS["near_duplicates"]
