"""Tasks on what the frozen backbone computed once and cached: its features (FeatureTask, the
head alone) or the activations entering its last stages (StageTask, --train_stages).

    cached = extract_features(config, backbone, device, splits, bottom=bottom)
    task = StageTask(config, classifier, device, cached, top)
"""
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from flower_classifier.data.transforms import augment_transform, eval_transform
from flower_classifier.models.features import FeatureExtractor, split_features
from flower_classifier.models.stages import StageModel, fold_batch_norms, split_backbone
from flower_classifier.training.tasks.base import (
    Task,
    gathered_order,
    report_unreadable,
    require_train_images,
    training_autocast,
)
from flower_classifier.utils import distributed


@dataclass
class CachedInputs:
    """What a task on cached features or activations trains on.

    data: {split: (inputs, labels)}, train's inputs [views, N, ...], unreadable images dropped;
    extracted: images that went through the backbone to build them; requested: images asked
    for (the rest came from the cache);
    kept_paths: {split: the readable images' paths}, None where not known (no mistakes sheet);
    split_features: {split: (features, ok)} of every image, what the data check compares;
    rooted: the inputs have been through the head's signed square root already (float32, as
    the studio's runs keep them: studio.retrain.rooted).
    """
    data: dict
    extracted: int = 0
    requested: int = 0
    kept_paths: dict | None = None
    split_features: dict | None = None
    rooted: bool = False


def view_seed(seed, view, path, root):
    """A stable per-image seed, so an augmented view is the same in every run and process: from
    its path below root, or its own path for a photo from elsewhere (corrections.json's added
    photos)."""
    path = Path(path)
    below = path.relative_to(root) if path.is_relative_to(root) else path
    name = f"{seed}:{view}:{below.as_posix()}"
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def extract_features(config, backbone, device, splits, bottom=None):
    """Each split's features once (train: the original and --augment views), unreadable
    dropped, as CachedInputs. bottom: keep instead the activations that enter the last
    config.train_stages stages (models.stages.split_backbone), each image's beside its mirror
    image's."""
    extractor = FeatureExtractor(backbone, device, cache_dir=config.cache_dir,
                                 batch_size=max(config.batch_size, 32), workers=config.workers,
                                 engine=config.engine,
                                 images=sum(len(split.paths) for split in splits.values()),
                                 bottom=bottom, trained_stages=config.train_stages)
    by_split = split_features(extractor, splits, eval_transform(backbone.preprocess),
                              config.mirror)
    features = {name: rows for name, (rows, _) in by_split.items()}
    ok_masks = {name: ok.clone() for name, (_, ok) in by_split.items()}
    train = splits["train"]
    views = [features["train"]]
    augment = augment_transform(backbone.preprocess)
    for view in range(1, config.augment + 1):
        seeds = [view_seed(config.seed, view, path, train.root) for path in train.paths]
        view_features, view_ok = extractor.features(
            train.root, train.paths, augment, seeds=seeds, view=f"augment {config.seed} {view}",
            description=f"train view {view}/{config.augment}",
            mirror=config.mirror == "all")
        views.append(view_features)
        ok_masks["train"] &= view_ok
    report_unreadable(splits, ok_masks, config.strict)
    data, kept_paths = {}, {}
    for name, split in splits.items():
        keep = ok_masks[name]
        labels = torch.tensor(split.labels, dtype=torch.long)[keep]
        inputs = torch.stack(views)[:, keep] if name == "train" else features[name][keep]
        data[name] = (inputs, labels)
        kept_paths[name] = [path for path, ok in zip(split.paths, keep.tolist()) if ok]
    require_train_images(len(data["train"][1]), train)
    return CachedInputs(data, extractor.computed, extractor.requested, kept_paths, by_split)


class FeatureTask(Task):
    """Head training on cached features (CachedInputs, train's inputs [views, N, D]): batches
    are slices of tensors, sharded across ranks. `model` is the classifier's head."""

    eval_batch_size = 1024

    def __init__(self, config, classifier, device, cached):
        self.keep_inputs(config, device, cached)
        self.model = classifier.head
        if device.type == "cpu":
            # The head's small matrix products gain nothing from a second thread, and lose
            # much when another process holds a core: one epoch took 2.3 s on one thread and
            # 7-46 s on two, on the 2-core machine with other work running.
            self.threads = 1
            # Epochs slowed from 0.30 to 0.36 s as training went on, on values decaying into
            # denormal floats; flushed to zero, all 50 stay at 0.30 s, with the same losses.
            # (Process-wide from here on, in this thread: calibration and reports too.)
            torch.set_flush_denormal(True)

    def keep_inputs(self, config, device, cached):
        """What this task and StageTask keep of the cached inputs and the config."""
        self.data, self.device = cached.data, device
        self.batch_size = distributed.per_process(config.batch_size)
        self.min_epoch_steps = config.min_epoch_steps
        self.extracted, self.requested = cached.extracted, cached.requested
        self.kept_paths = cached.kept_paths
        self.split_features = cached.split_features

    def train_batches(self, epoch):
        views, labels = self.data["train"]
        rows = self.epoch_rows()
        view_index = torch.randint(len(views), (rows,))  # each row its view, pass by pass
        for batch, view in zip(self.epoch_order(len(labels), rows).split(self.batch_size),
                               view_index.split(self.batch_size)):
            inputs = self.training_inputs(views[view, batch])
            yield inputs.float().to(self.device), labels[batch]

    def training_inputs(self, rows):
        """A training batch from its rows of the views drawn for it."""
        return rows

    def eval_batches(self, split):
        inputs, labels = self.data[split]
        for batch in distributed.shard(torch.arange(len(labels))).split(self.eval_batch_size):
            yield inputs[batch].float().to(self.device), labels[batch]

    def epoch_rows(self):
        """Training rows of one epoch on this rank: its share of the training set, or
        min_epoch_steps full batches where that is more (none where the share is empty)."""
        share = len(self.data["train"][1]) // distributed.world_size()
        return max(share, self.min_epoch_steps * self.batch_size) if share else 0

    @staticmethod
    def epoch_order(count, rows):
        """rows indices of this rank's share of count: a shuffled pass over the share, and more
        passes, shuffled anew, while rows asks for more."""
        share = count // distributed.world_size()
        passes = max(1, math.ceil(rows / share)) if share else 1
        return torch.cat([distributed.shard(torch.randperm(count))[:share]
                          for _ in range(passes)])[:rows]

    def steps_per_epoch(self):
        return math.ceil(self.epoch_rows() / self.batch_size)

    def frozen_features(self, split):
        """The train split's original view (not the augmented ones)."""
        features, labels = self.data[split]
        return (features[0] if split == "train" else features), labels

    def train_labels(self):
        return self.data["train"][1]

    def eval_paths(self, split):
        return gathered_order(self.kept_paths[split]) if self.kept_paths else None


class StageTask(FeatureTask):
    """--train_stages N: the backbone's last N stages train with the head on the activations that
    enter them, computed once and cached (models/stages.py), their batch norms folded into the
    convolutions (the pretrained statistics kept; not with --no_fold_norms). `model` is a
    models.stages.StageModel. A training batch takes each image's activations as they are or
    flipped left to right at random (--mirror off: never flipped; --mirror all: the mirror
    image's own activations, cached beside the image's, instead of the flipped map, at the
    cost of a second backbone pass over train/); evaluation averages the image's and its
    mirror image's features unless --mirror off, as predictions do.
    cached: as extract_features returns it with the bottom of split_backbone, whose top is top.
    (FeatureTask's one thread is the head's alone: the stages' convolutions use the cores.)"""
    eval_batch_size = 64  # the stages' convolutions ran 1.9x slower per image in batches of 256

    def __init__(self, config, classifier, device, cached, top):
        self.keep_inputs(config, device, cached)
        self.flip_maps = config.mirror != "off"
        classifier.train_stages(config.train_stages)
        self.model = StageModel(fold_batch_norms(top) if config.fold_norms else top,
                                classifier.head)

    def training_inputs(self, rows):
        """rows [B, views, C, H, W]: one of the cached views at random, else the activation
        map flipped left to right at random (the mirror image's map is close to it)."""
        pick = torch.randint(rows.shape[1], (len(rows),))
        inputs = rows[torch.arange(len(rows)), pick]
        if rows.shape[1] > 1 or not self.flip_maps:
            return inputs
        flip = torch.rand(len(rows)) < 0.5
        inputs[flip] = inputs[flip].flip(-1)
        return inputs

    @torch.inference_mode()
    def frozen_features(self, split):
        """Features of the stages as trained now, as predictions compute them (the train
        split's original view): the unknown verdict's class means and threshold come from
        the trained backbone's features, since predictions compare those."""
        inputs, labels = self.data[split]
        return stage_features(self.model, inputs[0] if split == "train" else inputs,
                              self.device), labels


@torch.inference_mode()
def stage_features(model, activations, device):
    """Features [N, D] of activations [N, views, C, H, W] through a StageModel's stages as they
    are now, the views averaged: in evaluation batches under training's autocast."""
    model.eval()
    with training_autocast(device):
        rows = [model.features(batch.float().to(device)).float().cpu()
                for batch in activations.split(StageTask.eval_batch_size)]
    return torch.cat(rows) if rows else torch.empty(0, 0)


def data_check_features(backbone, device, splits, settings):
    """(the data check's {split: (features, ok)}, the FeatureExtractor that read them), computed
    as train.py computes them with the same settings ({"train_stages", "mirror", "cache_dir",
    "workers"}), so that one feature cache serves both: with train_stages, the activations
    entering the last stages (train.py's cache) through the pretrained top
    (pretrained_top_features); else the backbone's features."""
    stages = settings["train_stages"]
    bottom, top = split_backbone(backbone, stages) if stages else (None, None)
    extractor = FeatureExtractor(backbone, device, cache_dir=settings["cache_dir"],
                                 workers=settings["workers"], bottom=bottom,
                                 trained_stages=stages,
                                 images=sum(len(split.paths) for split in splits.values()))
    by_split = split_features(extractor, splits, eval_transform(backbone.preprocess),
                              settings["mirror"])
    if top is not None:
        by_split = pretrained_top_features(top, by_split, device)
    return by_split, extractor


def pretrained_top_features(top, by_split, device):
    """{split: (float16 features [N, D], ok)} of each image (not its mirror image) through the
    pretrained top, before it trains: the features the data check compares."""
    stages = StageModel(top, head=None)
    return {name: (stage_features(stages, activations[:, :1], device).half(), ok)
            for name, (activations, ok) in by_split.items()}
