"""The checkpoint and train_state.pth: the one place that knows their schema.

    from flower_classifier.models.checkpoint import load_checkpoint, model_from_checkpoint
    checkpoint = load_checkpoint("checkpoints/checkpoint.pth")   # checked, weights_only
    model = model_from_checkpoint(checkpoint)                     # the trained classifier

A checkpoint is a dict of tensors and plain values (docs/data.md), loaded with
torch.load(..., weights_only=True) only: a checkpoint from a stranger cannot run code.
"""
import math
import pickle
import warnings
from pathlib import Path

import torch
from torchvision.transforms import InterpolationMode

from flower_classifier.models.backbones import Preprocess, build_backbone
from flower_classifier.models.classifier import FEATURE_TRANSFORMS, ImageClassifier, build_head
from flower_classifier.utils.console import warn
from flower_classifier.utils.errors import UserError, error_reason
from flower_classifier.utils.files import atomic_write

CHECKPOINT_FORMAT = 1
# A run's files in its save folder: the best model so far, and what continuing the run needs.
CHECKPOINT_NAME = "checkpoint.pth"
TRAIN_STATE_NAME = "train_state.pth"
# What every checkpoint holds; make_checkpoint writes them, load_checkpoint requires them.
CHECKPOINT_KEYS = ("format_version", "arch", "backbone", "head", "head_state", "class_to_idx",
                   "preprocess")
# What newer checkpoints add, and what a checkpoint without the key means (issue 11): features
# averaged with the mirror image's, logits divided by a temperature, and the unknown verdict's
# class means (float16 [C, D]) and cosine-similarity threshold (None: no verdict); (issue 20)
# the record of an automatic split of one folder (None: a train/valid/test layout); and with
# --train_stages (issue 22) the trained stages' weights, on top of the pretrained backbone's;
# (issue 32) the display names given at training, {folder name: name} (None: none were given).
OPTIONAL_KEYS = {"mirror": False, "temperature": 1.0, "class_means": None,
                 "unknown_threshold": None, "split": None, "stages_state": None,
                 "class_names": None}


def make_checkpoint(backbone, class_to_idx, head_spec, weights, **extra):
    """Exactly what rebuilds the model: plain values and tensors, loadable with weights_only.

    head_spec: {"hidden_units", "dropout", "feature_transform"};
    weights: ImageClassifier.trained_weights();
    extra: what training adds (hyperparameters, epoch, metrics, ...).
    """
    return {
        "format_version": CHECKPOINT_FORMAT,
        "arch": backbone.name,
        "backbone": backbone.weights,
        "head": {"in_features": backbone.feature_dim, "num_classes": len(class_to_idx),
                 **head_spec},
        "head_state": weights["head_state"],
        "backbone_state": weights["backbone_state"],
        **({"stages_state": weights["stages_state"]} if weights.get("stages_state") else {}),
        "class_to_idx": class_to_idx,
        "preprocess": backbone.preprocess.as_dict(),
        **extra,
    }


def save_checkpoint(checkpoint, path):
    """torch.save through a temporary file and a rename: the old file survives any crash."""
    atomic_write(path, lambda temporary: torch.save(checkpoint, temporary))


def first_byte(path):
    with open(path, "rb") as handle:
        return handle.read(1)


def load_checkpoint(path):
    """The checkpoint dict, loaded safely (weights_only) and checked, or a clear UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass the checkpoint.pth that train.py "
                        "wrote")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # about pickle protocols it refuses
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error) or first_byte(path) == pickle.PROTO:
            raise UserError(
                f"{path} holds pickled Python objects (such as a whole model saved with "
                "torch.save(model)), which could run code when loaded, so it is not loaded; "
                "use a checkpoint written by train.py") from None
        raise UserError(f"{path} is damaged or not a checkpoint; use another copy or train "
                        "again") from None
    except Exception as error:  # whatever the loader trips on, the file is not a checkpoint
        raise UserError(f"{path} is damaged or not a checkpoint ({error_reason(error)}); use "
                        "another copy or train again") from None
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint written by train.py (no format_version); "
                        "use a checkpoint written by train.py")
    if not isinstance(checkpoint["format_version"], int):
        raise UserError(f"{path} is damaged or not a checkpoint (format_version "
                        f"{checkpoint['format_version']!r}); use a checkpoint written by train.py")
    if checkpoint["format_version"] > CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {checkpoint['format_version']}, newer "
                        f"than this version reads ({CHECKPOINT_FORMAT}); update this tool")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; use a checkpoint written by train.py")
    return checkpoint


def checkpoint_arch(checkpoint):
    """The backbone's registered name (models/backbones.py), e.g. "efficientnet_lite0" or "cnn"."""
    return checkpoint["arch"]


def make_train_state(checkpoint, model, optimizer, scheduler, scaler, epoch_done, history):
    """train_state.pth: the best checkpoint so far plus the last epoch's training state
    (model, optimiser, scheduler, grad scaler), so a run can continue where it stopped."""
    return {**checkpoint, "last_model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(), "scheduler_state": scheduler.state_dict(),
            "scaler_state": scaler.state_dict(), "epoch_done": epoch_done, "history": history}


def load_train_state(path):
    """(train state, its path) of the run whose checkpoint.pth (or folder) is path."""
    path = Path(path)
    if ".previous" in path.name:
        raise UserError(f"--resume continues the run saved as {CHECKPOINT_NAME} and "
                        f"{TRAIN_STATE_NAME}; to continue the earlier run kept in {path.name}, "
                        "move it and train_state.previous.pth to a folder of their own without "
                        ".previous")
    state_path = path / TRAIN_STATE_NAME if path.is_dir() else path.with_name(TRAIN_STATE_NAME)
    if not state_path.is_file():
        raise UserError(f"nothing to resume: {state_path} not found (train.py writes it beside "
                        f"{CHECKPOINT_NAME} during training); pass the {CHECKPOINT_NAME} of a run")
    state = load_checkpoint(state_path)
    if "optimizer_state" not in state:
        raise UserError(f"{state_path} holds no training state; pass the {CHECKPOINT_NAME} of a "
                        "run")
    return state, state_path


def restore_train_state(state, model, optimizer, scheduler, scaler):
    """Load a train state's last epoch into the training objects; returns (best, history,
    epochs done): best as ImageClassifier.trained_weights() plus its epoch and metrics."""
    model.load_state_dict(state["last_model_state"])
    optimizer.load_state_dict(state["optimizer_state"])
    scheduler.load_state_dict(state["scheduler_state"])
    if state["scaler_state"]:  # empty when saved with the scaler off (CPU, bf16)
        scaler.load_state_dict(state["scaler_state"])
    best = {key: state[key] for key in ("head_state", "backbone_state", "epoch", "metrics")}
    best["stages_state"] = optional(state, "stages_state")
    return best, state["history"], state["epoch_done"]


def backbone_weights(checkpoint):
    """(arch, identity of the pretrained weights or None, the checkpoint's own backbone weights
    or None): what engines.weights_key names a converted backbone by. Trained stages: their
    weights, and the arch named with the pretrained weights under them."""
    own, stages = checkpoint.get("backbone_state"), optional(checkpoint, "stages_state")
    if stages is not None:
        return f"{checkpoint['arch']} on {sorted(checkpoint['backbone'].items())}", None, stages
    return checkpoint["arch"], None if own is not None else checkpoint["backbone"], own


def checkpoint_classes(checkpoint):
    """The class folder names in output index order."""
    class_to_idx = checkpoint["class_to_idx"]
    return sorted(class_to_idx, key=class_to_idx.get)


def checkpoint_names(checkpoint, category_names=None):
    """{class folder name: display name}: category_names where given (a --category_names file
    overrides), else the names the checkpoint keeps from training, else {} (folder names)."""
    return dict(category_names or optional(checkpoint, "class_names") or {})


def optional(checkpoint, key):
    """An OPTIONAL_KEYS value, its default for checkpoints written before it existed."""
    return checkpoint.get(key, OPTIONAL_KEYS[key])


def unknown_verdict(checkpoint):
    """(class means [C, D] float32, threshold) of the unknown verdict, or None when the
    checkpoint has none (written before issue 11, or fine-tuned)."""
    means, threshold = optional(checkpoint, "class_means"), optional(checkpoint, "unknown_threshold")
    if means is None or threshold is None:
        return None
    return means.float(), float(threshold)


def checkpoint_temperature(checkpoint):
    """The temperature that divides the logits; 1 (with a warning) for the NaN that fine-tuning
    on a tiny valid split could store before calibration.fit_temperature was bounded."""
    temperature = float(optional(checkpoint, "temperature"))
    if math.isfinite(temperature) and temperature > 0:
        return temperature
    warn(f"the checkpoint's temperature is {temperature}: its probabilities are left "
         "uncalibrated; train again to calibrate them")
    return 1.0


def checkpoint_preprocess(checkpoint):
    preprocess = Preprocess.from_dict(checkpoint["preprocess"])
    if preprocess.interpolation not in {mode.value for mode in InterpolationMode}:
        raise UserError(f"the checkpoint resizes images with {preprocess.interpolation!r}, "
                        "which this version does not know; update this tool")
    return preprocess


# What loading weights into the wrong model raises.
WEIGHT_MISMATCH_ERRORS = (KeyError, TypeError, ValueError, RuntimeError)


def damaged_checkpoint(error):
    return UserError("the checkpoint is damaged: its weights do not fit its model "
                     f"({error_reason(error)}); use another copy or train again")


def head_from_checkpoint(checkpoint):
    """The trained head alone, for features computed elsewhere (models/engines.py)."""
    spec = checkpoint["head"]
    transform = spec.get("feature_transform", "none") if isinstance(spec, dict) else "none"
    if transform not in FEATURE_TRANSFORMS:
        raise UserError(f"the checkpoint's head starts with feature transform {transform!r}, "
                        "which this version does not know; update this tool")
    try:
        head = build_head(spec["in_features"], spec["num_classes"], spec["hidden_units"],
                          spec["dropout"], transform)
        head.load_state_dict(checkpoint["head_state"])
    except WEIGHT_MISMATCH_ERRORS as error:
        raise damaged_checkpoint(error) from None
    return head.eval()


def model_from_checkpoint(checkpoint, pretrained=True, temperature=None):
    """Rebuild the trained classifier, refusing a backbone whose weights differ from training's;
    temperature: checkpoint_temperature() where the caller has it already (one warning).

    A checkpoint with its own backbone weights (fine-tuned or trained from scratch) needs no
    pretrained download.
    """
    own_backbone = checkpoint.get("backbone_state") is not None
    backbone = build_backbone(checkpoint["arch"], pretrained=pretrained and not own_backbone)
    if not own_backbone and pretrained and backbone.weights != checkpoint["backbone"]:
        raise UserError(
            f"the checkpoint was trained on backbone weights {checkpoint['backbone']} but the "
            f"installed ones are {backbone.weights}; install the weights it was trained with, "
            "or train again")
    try:
        model = ImageClassifier(backbone, head_from_checkpoint(checkpoint),
                                mirror=bool(optional(checkpoint, "mirror")),
                                temperature=temperature or checkpoint_temperature(checkpoint))
        model.load_trained_weights(checkpoint)
    except WEIGHT_MISMATCH_ERRORS as error:
        raise damaged_checkpoint(error) from None
    return model.eval()
