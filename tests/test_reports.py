"""flower_classifier/reports: the test report's numbers on hand-made predictions, and that every plot writes a
readable PNG atomically (no temporary file left behind)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flower_classifier.reports import contact_sheets, plots, test_report

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
