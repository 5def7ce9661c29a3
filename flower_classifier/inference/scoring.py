"""Score a checkpoint on a labelled folder of one's own (predict.py --report): its sub-folders
are the checkpoint's class folders.

    evaluation = score_folder(predictor, "my_test", "report")   # writes report/ as training does
"""
import numpy as np

from flower_classifier.data.folders import class_folders, list_split
from flower_classifier.models.explain import heatmap_drawer
from flower_classifier.reports.evaluation import write_evaluation
from flower_classifier.utils.console import warn
from flower_classifier.utils.errors import UserError


def labelled_images(predictor, source):
    """The Split of source's class folders, labelled in the checkpoint's class order."""
    class_to_idx = {name: index for index, name in enumerate(predictor.classes)}
    unknown = sorted(set(class_folders(source)) - set(class_to_idx))
    if unknown:
        raise UserError(f"{source} has class folders the checkpoint does not know: "
                        f"{', '.join(unknown[:5])}; --report scores a folder of its class folders "
                        f"(such as {', '.join(predictor.classes[:3])})")
    split = list_split(source, class_to_idx)
    if not split.paths:
        raise UserError(f"{source} holds no images in class folders; put each class's images in "
                        "a folder named after the class")
    return split


def score_folder(predictor, source, folder, batch_size, workers=None):
    """Predict every image below source's class folders and write the evaluation (report,
    confusion matrix, mistakes) to folder; returns the Evaluation."""
    split = labelled_images(predictor, source)
    class_count = len(predictor.classes)
    index_of = {name: index for index, name in enumerate(predictor.classes)}
    paths, labels, probabilities = [], [], []
    for prediction, label in zip(predictor.predict_files(split.paths, class_count, batch_size,
                                                         workers), split.labels):
        if prediction.ok:
            row = np.zeros(class_count)
            row[[index_of[name] for name in prediction.classes]] = prediction.probabilities
            paths.append(prediction.path)
            labels.append(label)
            probabilities.append(row)
    if not paths:
        raise UserError(f"none of the {len(split.paths)} images in {source} could be read; "
                        "pass photos such as JPEG or PNG")
    skipped = len(split.paths) - len(paths)
    if skipped:
        warn(f"skipped {skipped} unreadable images")
    return write_evaluation(folder, labels, np.stack(probabilities), predictor.names, paths,
                            heatmap=heatmap_drawer(predictor.model, predictor.names))
