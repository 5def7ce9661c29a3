"""Prediction as a library: load a checkpoint once, then classify images, lists or folders.

    from predictor import Predictor
    predictor = Predictor("checkpoints/checkpoint.pth", category_names={"1": "pink primrose"})
    prediction = predictor.predict_image("flower.jpg", top_k=5)
    prediction.names, prediction.probabilities        # most likely first
    for prediction in predictor.predict_files(paths, top_k=1):   # batched, decoding workers
        print(prediction.as_json())

predict.py, export.py's parity check, the benchmarks and serve.py all go through this class.
"""
from dataclasses import dataclass, field

import torch
from PIL import Image

from common import UserError, progress
from data_utils import (
    UNREADABLE_IMAGE_ERRORS,
    ImageFiles,
    check_category_names,
    display_names,
    eval_transform,
    load_image,
)
from features import autocast, default_workers, image_loader, inference_backbone
from model_utils import (
    checkpoint_classes,
    checkpoint_preprocess,
    load_checkpoint,
    model_from_checkpoint,
)

BATCH_SIZE = 64  # images per batch for a folder: enough to keep the cores busy


@dataclass
class Prediction:
    """The top classes of one image, most likely first; ok is False for an unreadable file."""
    path: str
    classes: list = field(default_factory=list)   # class folder names
    names: list = field(default_factory=list)     # display names
    probabilities: list = field(default_factory=list)
    ok: bool = True

    def as_json(self):
        """predict.py --json's object for this image."""
        return {"path": self.path, "classes": self.classes, "names": self.names,
                "probabilities": self.probabilities}


class Predictor:
    """A trained classifier in eval mode on one device, with its classes and preprocessing."""

    def __init__(self, checkpoint_path, device=torch.device("cpu"), category_names=None):
        checkpoint = load_checkpoint(checkpoint_path)
        self.device = device
        self.model = model_from_checkpoint(checkpoint).to(device)
        self.classes = checkpoint_classes(checkpoint)
        check_category_names(category_names or {}, self.classes)
        self.names = display_names(self.classes, category_names or {})
        self.preprocess = checkpoint_preprocess(checkpoint)
        self.transform = eval_transform(self.preprocess)
        self._fast_backbone = None

    def fast_backbone(self):
        """The backbone compiled for batched inference, built on first use: it costs seconds
        that only pay back over many images."""
        if self._fast_backbone is None:
            self._fast_backbone = inference_backbone(self.model.backbone, self.device,
                                                     self.preprocess.crop)
        return self._fast_backbone

    @torch.inference_mode()
    def probabilities(self, images, fast=False):
        """Class probabilities [N, C] (index order) of a preprocessed float batch [N, 3, H, W]."""
        images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        backbone = self.fast_backbone() if fast else self.model.backbone
        with autocast(self.device):
            logits = self.model.head(backbone(images))
        return logits.float().softmax(dim=1).cpu()

    def top(self, probabilities, top_k, paths):
        """A Prediction per row of probabilities, top_k clamped to the number of classes."""
        values, indices = probabilities.topk(min(top_k, len(self.classes)))
        predictions = []
        for path, row, index in zip(paths, values.tolist(), indices.tolist()):
            classes = [self.classes[i] for i in index]
            predictions.append(Prediction(str(path), classes, [self.names[i] for i in index], row))
        return predictions

    def predict_images(self, images, top_k=5, paths=None):
        """Predictions for decoded PIL images, as one batch."""
        paths = paths if paths is not None else [""] * len(images)
        if not images:
            return []
        batch = torch.stack([self.transform(image) for image in images])
        return self.top(self.probabilities(batch, fast=len(images) > 1), top_k, paths)

    def predict_image(self, image, top_k=5, path=None):
        """The Prediction for one image: a PIL image, or the path of an image file."""
        if not isinstance(image, Image.Image):
            path = image if path is None else path
            try:
                image = load_image(image)
            except UNREADABLE_IMAGE_ERRORS as error:
                raise UserError(f"cannot read image {path} ({error}); pass a photo such as a "
                                "JPEG or PNG file") from None
        return self.predict_images([image], top_k, [path if path is not None else ""])[0]

    def predict_files(self, paths, top_k=5, batch_size=BATCH_SIZE, workers=None):
        """Yield a Prediction per file, in order, batched with decoding worker processes; an
        unreadable file yields Prediction(path, ok=False)."""
        workers = default_workers() if workers is None else workers
        dataset = ImageFiles(paths, self.transform, self.preprocess.crop)
        loader = image_loader(dataset, batch_size, workers if len(paths) > 1 else 0, self.device)
        position = 0
        for images, _, ok in progress(loader, len(loader), "predicting", unit="batches"):
            batch_paths = paths[position:position + len(ok)]
            position += len(ok)
            readable = iter(self.top(self.probabilities(images[ok], fast=True), top_k,
                                     [p for p, good in zip(batch_paths, ok.tolist()) if good])
                            if ok.any() else [])
            for path, good in zip(batch_paths, ok.tolist()):
                yield next(readable) if good else Prediction(str(path), ok=False)
