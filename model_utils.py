"""The model and its checkpoint under the assignment's name: what a course-follower imports to
build a classifier, or to load the checkpoint train.py wrote and use it.

    from model_utils import load_checkpoint, model_from_checkpoint, checkpoint_classes
    checkpoint = load_checkpoint("checkpoints/checkpoint.pth")  # checked, weights_only
    model = model_from_checkpoint(checkpoint)                    # eval mode, on the CPU
    classes = checkpoint_classes(checkpoint)                     # class folder names, index order

The library itself lives in flower_classifier/models/ (this file only names its public parts);
for predictions, flower_classifier.Predictor does the rest (preprocessing, calibration, the
unknown verdict).
"""
from flower_classifier.models.backbones import build_backbone
from flower_classifier.models.checkpoint import (
    checkpoint_classes,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from flower_classifier.models.classifier import ImageClassifier, build_head

__all__ = ["ImageClassifier", "build_backbone", "build_head", "checkpoint_classes",
           "load_checkpoint", "model_from_checkpoint", "save_checkpoint"]
