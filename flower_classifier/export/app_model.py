"""The model an app calls: uint8 RGB pixels in, calibrated probabilities out.

    from flower_classifier.export.app_model import app_model, app_pixels
    model = app_model(checkpoint)                  # torch module, eval mode, on the CPU
    pixels = app_pixels(load_image("flower.jpg"), checkpoint_preprocess(checkpoint))
    probabilities, similarity = model(torch.from_numpy(pixels)[None])

Everything predict.py does after the crop happens inside: scaling to [0, 1], the backbone's
normalisation, the mirror image's features averaged in, the temperature, the softmax and, when
the checkpoint has the unknown verdict, the cosine similarity to the nearest class mean. An app
then only resizes the shorter side and centre-crops (app_pixels does just that, for the checks),
so it cannot resize, crop or normalise differently from Python by mistake.
"""
import numpy as np
import torch
from torch import nn

from flower_classifier.data.transforms import resize_and_crop
from flower_classifier.models.calibration import nearest_similarity
from flower_classifier.models.checkpoint import (
    checkpoint_preprocess,
    model_from_checkpoint,
    unknown_verdict,
)

PROBABILITIES, SIMILARITY = "probabilities", "similarity"  # the outputs' names, in order


def mirror_averaged(backbone, images):
    """models.classifier.backbone_features with the mirror, as one backbone call on the images and
    their mirrors together: each weight used once, as int8 quantisation for XNNPACK needs."""
    features = backbone(torch.cat([images, images.flip(3)]))
    return features.unflatten(0, (2, -1)).mean(dim=0)  # no batch size traced into the graph


class AppModel(nn.Module):
    """pixels [N, H, W, 3] uint8 (NHWC, what a camera bitmap holds) or, with channels_first,
    [N, 3, H, W] of any dtype in 0..255 (what Core ML makes of an image) -> probabilities [N, C]
    and, when there is a verdict, similarity [N]."""

    def __init__(self, classifier, preprocess, class_means=None, channels_first=False):
        super().__init__()
        self.classifier, self.channels_first = classifier, channels_first
        std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
        mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
        # (pixels / 255 - mean) / std as one multiply-add.
        self.register_buffer("scale", 1 / (255 * std))
        self.register_buffer("shift", mean / std)
        self.register_buffer("class_means", class_means)

    def forward(self, pixels):
        images = pixels.float() if self.channels_first else pixels.permute(0, 3, 1, 2).float()
        images = images * self.scale - self.shift
        classifier = self.classifier
        features = mirror_averaged(classifier.backbone, images) if classifier.mirror else (
            classifier.backbone(images))
        probabilities = (classifier.head(features) / classifier.temperature).softmax(dim=1)
        if self.class_means is None:
            return probabilities
        return probabilities, nearest_similarity(features, self.class_means)


class GlobalMaxPool(nn.Module):
    """AdaptiveMaxPool2d(1) as a max over height and width: the same numbers, in core ATen
    operators (adaptive_max_pool2d is not one, and ExecuTorch refuses it)."""

    def forward(self, features):
        return features.amax(dim=(2, 3), keepdim=True)


def with_portable_operators(module):
    """module with its global max-pooling (the --arch cnn network's) made GlobalMaxPool."""
    for name, child in module.named_children():
        if isinstance(child, nn.AdaptiveMaxPool2d) and child.output_size in (1, (1, 1)):
            setattr(module, name, GlobalMaxPool())
        else:
            with_portable_operators(child)
    return module


def app_model(checkpoint, channels_first=False):
    """The checkpoint's classifier behind the app-facing input and outputs."""
    verdict = unknown_verdict(checkpoint)
    classifier = with_portable_operators(model_from_checkpoint(checkpoint))
    return AppModel(classifier, checkpoint_preprocess(checkpoint),
                    verdict[0] if verdict else None, channels_first).cpu().eval()


def output_names(checkpoint):
    return [PROBABILITIES, SIMILARITY] if unknown_verdict(checkpoint) else [PROBABILITIES]


def app_pixels(image, preprocess):
    """What an app feeds the model for a decoded RGB PIL image: the shorter side resized with
    the checkpoint's filter, the centre crop, as uint8 [crop, crop, 3]; nothing else."""
    return np.array(resize_and_crop(preprocess)(image), dtype=np.uint8)
