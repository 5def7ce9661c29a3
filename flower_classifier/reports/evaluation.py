"""One scored set of photos written as a person reads it: test_report.json, confusion_matrix.png,
mistakes.png and mistakes.html. Training writes it for test/, predict.py --report for a folder of
one's own.

    evaluation = write_evaluation("runs/x", labels, probabilities, class_names, paths)
    print("\n".join(evaluation_lines(evaluation, "runs/x")))
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flower_classifier.reports.contact_sheets import plot_mistakes
from flower_classifier.reports.mistakes_page import write_mistakes_page
from flower_classifier.reports.plots import plot_confusion_matrix
from flower_classifier.reports.test_report import save_test_report, summarize_report, test_report

REPORT_NAME, CONFUSION_NAME = "test_report.json", "confusion_matrix.png"
MISTAKES_NAME, MISTAKES_PAGE_NAME = "mistakes.png", "mistakes.html"


@dataclass
class Evaluation:
    """The test report, and how many wrongly named photos mistakes.png and mistakes.html show
    (None: not drawn, the photos' order being unknown)."""
    report: dict
    mistakes: int | None


def write_evaluation(folder, labels, probabilities, class_names, paths=None, calibration=None,
                     heatmap=None):
    """Score probabilities [N, C] (array-like) against labels [N]; write the report, the
    confusion matrix and, where paths (in the same order) are given, the mistakes sheet and
    page into folder. calibration: reports.test_report.calibration_section() of the same
    photos; heatmap(path) -> PNG bytes: where the model looked, for the page."""
    folder = Path(folder)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    predictions = probabilities.argmax(1)
    report = test_report(labels, predictions, class_names, calibration=calibration)
    save_test_report(report, folder / REPORT_NAME)
    plot_confusion_matrix(labels, predictions, class_names, folder / CONFUSION_NAME)
    if paths is None:
        return Evaluation(report, None)
    wrong = plot_mistakes(paths, labels, probabilities, class_names, folder / MISTAKES_NAME)
    write_mistakes_page(paths, labels, probabilities, class_names, folder / MISTAKES_PAGE_NAME,
                        heatmap)
    return Evaluation(report, wrong)


def evaluation_lines(evaluation, folder):
    """The summary for the terminal and what was saved where."""
    saved = [REPORT_NAME, CONFUSION_NAME] + ([MISTAKES_NAME, MISTAKES_PAGE_NAME]
                                             if evaluation.mistakes else [])
    listing = f"{', '.join(saved[:-1])} and {saved[-1]}"
    mistakes = (f" (mistakes.png and .html: the {evaluation.mistakes} wrongly named photos, "
                "worst first)" if evaluation.mistakes else "")
    return [summarize_report(evaluation.report), f"saved {listing} in {folder}{mistakes}"]
