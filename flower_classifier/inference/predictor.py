"""Prediction as a library: load a checkpoint once, then classify images, lists or folders.

    from flower_classifier import Predictor
    predictor = Predictor("checkpoints/checkpoint.pth", category_names={"1": "pink primrose"})
    prediction = predictor.predict_image("flower.jpg", top_k=5)
    prediction.names, prediction.probabilities        # most likely first
    prediction.known       # False: none of the known classes; None: the checkpoint has no verdict
    for prediction in predictor.predict_files(paths, top_k=1):   # batched, decoding workers
        print(prediction.as_json())

predict.py, export.py's parity check, the benchmarks and serve.py all go through this class.
"""
import math
from dataclasses import dataclass, field
from itertools import islice

import torch
from PIL import Image

from flower_classifier.data.class_names import check_category_names, display_names
from flower_classifier.data.images import UNREADABLE_IMAGE_ERRORS, load_image
from flower_classifier.data.loading import default_workers, image_loader
from flower_classifier.data.transforms import eval_transform
from flower_classifier.models.calibration import nearest_similarity
from flower_classifier.models.checkpoint import (
    backbone_weights,
    checkpoint_classes,
    checkpoint_names,
    checkpoint_preprocess,
    checkpoint_temperature,
    head_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    optional,
    unknown_verdict,
)
from flower_classifier.models.classifier import backbone_features
from flower_classifier.models.engines import autocast, compile_backbone, weights_key
from flower_classifier.utils.console import progress
from flower_classifier.utils.errors import UserError, error_reason

BATCH_SIZE = 64  # images per batch for a folder: enough to keep the cores busy


@dataclass
class Prediction:
    """The top classes of one image, most likely first; ok is False for an unreadable file."""
    path: str
    classes: list = field(default_factory=list)   # class folder names
    names: list = field(default_factory=list)     # display names
    probabilities: list = field(default_factory=list)
    ok: bool = True
    known: bool | None = None  # None: no unknown verdict (the checkpoint has none, or it is off)
    error: str | None = None  # why an unreadable file could not be read

    def as_json(self):
        """predict.py --json's object for this image ("known" only where there is a verdict);
        for an unreadable file, its path and the error."""
        if not self.ok:
            return {"path": self.path, "error": self.error}
        fields = {"path": self.path, "classes": self.classes, "names": self.names,
                  "probabilities": self.probabilities}
        return fields if self.known is None else {**fields, "known": self.known}


class FileBatches(torch.utils.data.Dataset):
    """Decodes a whole batch, given as the key itself: dataset[[(key, path), ...]] is
    (that list, the readable images [R, 3, H, W], per path None or why it is unreadable).
    A DataLoader whose sampler is a stream of such batches then decodes in worker processes
    while the paths are still being listed: nothing holds the whole list."""

    def __init__(self, transform, preprocess):
        self.transform, self.preprocess = transform, preprocess

    def __getitem__(self, batch):
        images, errors = [], []
        for _, path in batch:
            try:
                images.append(self.transform(load_image(path, self.preprocess.resize)))
                errors.append(None)
            except UNREADABLE_IMAGE_ERRORS as error:
                errors.append(error_reason(error))
        crop = self.preprocess.crop
        return batch, torch.stack(images) if images else torch.zeros(0, 3, crop, crop), errors


def batched(items, size):
    """Lists of up to size consecutive items of an iterable."""
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch


class Predictor:
    """A trained classifier in eval mode on one device, with its classes and preprocessing.

    unknown_threshold: the cosine similarity to the nearest class mean below which an image is
    none of the known classes (set from the checkpoint; None turns the verdict off).
    """

    def __init__(self, checkpoint_path, device=torch.device("cpu"), category_names=None,
                 engine="auto"):
        """engine: "auto", "torch" or "openvino" (models/engines.py)."""
        self.checkpoint = load_checkpoint(checkpoint_path)
        self.device, self.engine = device, engine
        self.head = head_from_checkpoint(self.checkpoint).to(device)
        self.classes = checkpoint_classes(self.checkpoint)
        check_category_names(category_names or {}, self.classes)
        self.names = display_names(self.classes, checkpoint_names(self.checkpoint,
                                                                  category_names))
        self.preprocess = checkpoint_preprocess(self.checkpoint)
        self.transform = eval_transform(self.preprocess)
        self.weights = weights_key(*backbone_weights(self.checkpoint))
        self._model, self.engines = None, {}  # job size -> engine
        verdict = unknown_verdict(self.checkpoint)
        self.class_means, self.unknown_threshold = verdict if verdict else (None, None)
        self.mirror = optional(self.checkpoint, "mirror")
        self.temperature = checkpoint_temperature(self.checkpoint)

    @property
    def model(self):
        """The whole torch classifier, built on first use: OpenVINO with a converted model on
        disk needs only the head, and building the backbone costs about a second."""
        if self._model is None:
            self._model = model_from_checkpoint(self.checkpoint,
                                                temperature=self.temperature).to(self.device)
        return self._model

    def backbone_engine(self, images):
        """The backbone engine for a job of `images` images (engines.compile_backbone picks
        it), chosen once per job size and shared by the job sizes that pick the same engine:
        the batches of a folder or a server ask again and again."""
        if images not in self.engines:
            engine = compile_backbone(lambda: self.model.backbone, self.preprocess.crop,
                                      self.device, self.engine, images, weights=self.weights)
            self.engines[images] = next(
                (known for known in self.engines.values() if known.name == engine.name), engine)
        return self.engines[images]

    def outputs(self, images, job_size=None):
        """(class probabilities [N, C] in index order, known [N] bool or None without a
        verdict) of a preprocessed float batch [N, 3, H, W]; job_size: the images of the whole
        job this batch is part of (default: the batch's), for the engine's choice."""
        probabilities, known, _ = self.outputs_and_features(images, job_size)
        return probabilities, known

    @torch.inference_mode()
    def outputs_and_features(self, images, job_size=None):
        """outputs(), and the backbone features [N, D] (float, on the CPU) they came from:
        what --suggest compares photos by, at no extra cost."""
        engine = self.backbone_engine(job_size or len(images))
        features = backbone_features(engine, images, self.mirror).to(self.device)
        with autocast(self.device):
            logits = self.head(features) / self.temperature
        known = None
        if self.unknown_threshold is not None:
            similarity = nearest_similarity(features.float().cpu(), self.class_means)
            known = similarity >= self.unknown_threshold
        return logits.float().softmax(dim=1).cpu(), known, features.float().cpu()

    def top(self, outputs, top_k, paths):
        """A Prediction per image of outputs(); top_k, one for all images or one per image, is
        clamped to the number of classes."""
        probabilities, known = outputs
        top_ks = [top_k] * len(paths) if isinstance(top_k, int) else top_k
        known = [None] * len(paths) if known is None else known.tolist()
        predictions = []
        for path, row, k, verdict in zip(paths, probabilities, top_ks, known):
            values, indices = row.topk(min(k, len(self.classes)))
            predictions.append(Prediction(str(path), [self.classes[i] for i in indices.tolist()],
                                          [self.names[i] for i in indices.tolist()],
                                          values.tolist(), known=verdict))
        return predictions

    def predict_images(self, images, top_k=5, paths=None):
        """Predictions for decoded PIL images, as one batch."""
        paths = paths if paths is not None else [""] * len(images)
        if not images:
            return []
        batch = torch.stack([self.transform(image) for image in images])
        return self.top(self.outputs(batch), top_k, paths)

    def predict_image(self, image, top_k=5, path=None):
        """The Prediction for one image: a PIL image, or the path of an image file."""
        if not isinstance(image, Image.Image):
            path = image if path is None else path
            try:
                image = load_image(image, self.preprocess.resize)
            except UNREADABLE_IMAGE_ERRORS as error:
                raise UserError(f"cannot read image {path} ({error}); pass a photo such as a "
                                "JPEG or PNG file") from None
        return self.predict_images([image], top_k, [path if path is not None else ""])[0]

    def predict_batches(self, items, top_k=5, batch_size=BATCH_SIZE, workers=None,
                        job_size=None):
        """For an iterable of (key, path), read lazily, yield per batch a list of (key,
        Prediction) in order, decoded by worker processes; an unreadable file's Prediction
        has ok=False and the error. job_size: the images of the whole job, for the engine."""
        for batch, errors, outputs in self.output_batches(items, batch_size, workers, job_size):
            readable = [path for (_, path), error in zip(batch, errors) if error is None]
            predictions = iter(self.top(outputs[:2], top_k, readable) if readable else [])
            yield [(key, next(predictions) if error is None
                    else Prediction(str(path), ok=False, error=error))
                   for (key, path), error in zip(batch, errors)]

    def output_batches(self, items, batch_size=BATCH_SIZE, workers=None, job_size=None):
        """predict_batches' stream before the top-k: per batch (the (key, path) list, per path
        None or why it is unreadable, outputs_and_features() of the readable images or None
        where none is)."""
        workers = default_workers() if workers is None else workers
        loader = image_loader(FileBatches(self.transform, self.preprocess), None, workers,
                              self.device, sampler=batched(items, batch_size))
        for batch, images, errors in loader:
            readable = any(error is None for error in errors)
            yield batch, errors, (self.outputs_and_features(images, job_size) if readable
                                  else None)

    def predict_files(self, paths, top_k=5, batch_size=BATCH_SIZE, workers=None):
        """Yield a Prediction per file, in order (predict_batches with a progress bar)."""
        batches = self.predict_batches(((None, path) for path in paths), top_k, batch_size,
                                       workers if len(paths) > 1 else 0, len(paths))
        for batch in progress(batches, math.ceil(len(paths) / batch_size), "predicting",
                              unit="batches"):
            for _, prediction in batch:
                yield prediction
