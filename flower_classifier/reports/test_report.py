"""The test report: accuracy, each class's recall and precision, the frequent mix-ups, and the
calibration, as JSON and as a few terminal lines.

    from flower_classifier.reports.test_report import test_report, summarize_report
    report = test_report(labels, predictions, class_names)
    print(summarize_report(report))
"""
import numpy as np

from flower_classifier.utils.files import write_json


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
    from flower_classifier.models.calibration import ECE_BINS, expected_calibration_error

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
