"""What a training epoch iterates over: one Task per kind of training, made by make_task.

    task = make_task(config, backbone, splits, device, classifier)
    for inputs, labels in task.train_batches(epoch): ...   # inputs on device, labels on the CPU

FeatureTask: the default. The backbone is frozen, so each image's features are computed once
(features.py, cached on disk) and only the head trains, on slices of those tensors.
StageTask: --train_stages N. As FeatureTask, but what is cached is the input of the backbone's
last N stages, and those stages train with the head (stage_split.py).
ImageTask: --finetune. Images are decoded and augmented on the fly and go through the backbone,
whose chosen stages train with the head.
ScratchTask: --arch cnn. Small images decoded once into memory; the whole network trains.
"""
import hashlib
import math
import time
from pathlib import Path

import torch

import distributed
import engines
import scratch_cnn
from backbones import Preprocess
from common import UserError, log, warn
from data_utils import ImageFiles, augment_transform, eval_transform, image_loader, is_readable
from datacheck import split_features
from features import FeatureExtractor
from stage_split import StageModel, fold_batch_norms, split_backbone


def training_autocast(device):
    """engines.autocast() for training steps, and bf16 on a CPU that computes it natively: there
    the default head's epoch on cached features took 0.30 s instead of 0.37 s in float32 (batches
    of 64, one thread; 0.19 s instead of 0.28 s in batches of 256), at the same cross-validated
    accuracy (benchmarks/quality.py)."""
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=engines.cpu_has_native_bf16())
    return engines.autocast(device)


class Task:
    """The contract the Trainer relies on; every rank holds its own Task.

    model: the module that trains and is evaluated (the head, or the whole classifier); the
        batches feed it.
    extracted: how many images went through the backbone to build the task (for the log).
    split_features: {split: (features, ok)} of every image, what the data check compares;
        None where the backbone trains and features are not fixed.
    """
    model: torch.nn.Module
    extracted: int = 0
    split_features = None

    def train_batches(self, epoch):
        """This rank's training batches for one epoch: (inputs on the device, labels on the
        CPU). The trainer seeds torch's generator per epoch before calling it."""
        raise NotImplementedError

    def eval_batches(self, split):
        """This rank's share of a split ("valid" or "test"), in order, unaugmented."""
        raise NotImplementedError

    def steps_per_epoch(self):
        """Training batches per epoch on this rank: the learning-rate schedule counts them."""
        raise NotImplementedError

    def frozen_features(self, split):
        """(backbone features, labels) of a split for the unknown verdict, or None where the
        backbone trains and features are not fixed."""
        return None

    def train_labels(self):
        """The labels of the training images (every rank's), for the class weights."""
        raise NotImplementedError

    def eval_paths(self, split):
        """The paths of a split's images in the order evaluate() gathers them (rank by rank,
        unreadable ones left out), or None where that order is not known ahead."""
        raise NotImplementedError


def make_task(config, backbone, splits, device, classifier):
    """The Task for this run: from scratch, fine-tuning or on cached features."""
    if not backbone.pretrained:
        for flag in ("finetune", "train_stages"):
            if getattr(config, flag):
                warn(f"--{flag} is ignored with --arch {config.arch}: the whole network trains "
                     "from scratch")
        return ScratchTask(config, backbone, splits, device, classifier)
    if config.finetune and config.train_stages:
        raise UserError("--finetune trains on images, --train_stages on cached activations; "
                        "choose one of them")
    if config.finetune:
        return ImageTask(config, backbone, splits, device, classifier)
    if config.train_stages:
        bottom, top = split_backbone(backbone, config.train_stages)
        data, computed, by_split, kept_paths = extract_features(config, backbone, device, splits,
                                                                bottom=bottom)
        checked = (pretrained_top_features(top, by_split, device)
                   if config.data_check and distributed.is_main() else None)
        return StageTask(data, config, top, classifier, device, computed, kept_paths, checked)
    data, computed, by_split, kept_paths = extract_features(config, backbone, device, splits)
    return FeatureTask(data, config.batch_size, classifier, device, computed, kept_paths,
                       by_split)


def report_unreadable(splits, ok_masks, strict):
    """One summary line for skipped files (or, with --strict, an error before training)."""
    bad = [path for name, split in splits.items()
           for path, ok in zip(split.paths, ok_masks[name].tolist()) if not ok]
    if not bad:
        return
    listing = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
    if strict:
        raise UserError(f"{len(bad)} unreadable images ({listing}); fix or remove them, or leave "
                        "out --strict to skip them")
    warn(f"skipped {len(bad)} unreadable images ({listing}); --strict makes this an error")


def require_train_images(count, split):
    """No readable image in valid/ is caught by the Trainer after the first epoch."""
    if not count:
        raise UserError(f"no readable images in train/; check the files in {split.root}")


def gathered_order(paths):
    """paths in the order evaluate() gathers their results: each rank's shard in turn."""
    world = distributed.world_size()
    return [paths[index] for rank in range(world) for index in range(rank, len(paths), world)]


def view_seed(seed, view, path, root):
    """A stable per-image seed, so an augmented view is the same in every run and process."""
    name = f"{seed}:{view}:{Path(path).relative_to(root).as_posix()}"
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def extract_features(config, backbone, device, splits, bottom=None):
    """Each split's features once (train: the original and --augment views), unreadable
    dropped; returns ({split: (inputs, labels)}, images computed, {split: (features, ok)} as
    extracted, {split: readable paths}). bottom: keep instead the activations that enter the
    last config.train_stages stages (stage_split.split_backbone), each image's beside its
    mirror image's."""
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
    return data, extractor.computed, by_split, kept_paths


class FeatureTask(Task):
    """Head training on cached features: batches are slices of tensors, sharded across ranks.
    `model` is the classifier's head. data, extracted, kept_paths, split_features: as
    extract_features returns them (train's inputs [views, N, D]); kept_paths None where the
    images' paths are not known (no mistakes sheet)."""

    eval_batch_size = 1024

    def __init__(self, data, batch_size, classifier, device, extracted=0, kept_paths=None,
                 split_features=None):
        self.data, self.batch_size, self.device = data, batch_size, device
        self.extracted, self.kept_paths = extracted, kept_paths
        self.split_features = split_features
        self.model = classifier.head
        if device.type == "cpu":
            # The head's small matrix products gain nothing from a second thread, and lose
            # much when another process holds a core: one epoch took 2.3 s on one thread and
            # 7-46 s on two, on the 2-core machine with other work running.
            torch.set_num_threads(1)
            # Epochs slowed from 0.30 to 0.36 s as training went on, on values decaying into
            # denormal floats; flushed to zero, all 50 stay at 0.30 s, with the same losses.
            # (Process-wide from here on, in this thread: calibration and reports too.)
            torch.set_flush_denormal(True)

    def train_batches(self, epoch):
        views, labels = self.data["train"]
        count = len(labels)
        view_index = torch.randint(len(views), (count,))
        order = distributed.shard(torch.randperm(count))[:count // distributed.world_size()]
        for batch in order.split(self.batch_size):
            inputs = self.training_inputs(views[view_index[batch], batch])
            yield inputs.float().to(self.device), labels[batch]

    def training_inputs(self, rows):
        """A training batch from its rows of the views drawn for it."""
        return rows

    def eval_batches(self, split):
        inputs, labels = self.data[split]
        for batch in distributed.shard(torch.arange(len(labels))).split(self.eval_batch_size):
            yield inputs[batch].float().to(self.device), labels[batch]

    def steps_per_epoch(self):
        return math.ceil(len(self.data["train"][1]) // distributed.world_size() / self.batch_size)

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
    enter them, computed once and cached (stage_split.py), their batch norms folded into the
    convolutions (the pretrained statistics kept; not with --no_fold_norms). `model` is a
    stage_split.StageModel. A training batch takes each image's activations as they are or
    flipped left to right at random (--mirror off: never flipped; --mirror all: the mirror
    image's own activations, cached beside the image's, instead of the flipped map, at the
    cost of a second backbone pass over train/); evaluation averages the image's and its
    mirror image's features unless --mirror off, as predictions do.
    data: as extract_features returns it with the bottom of split_backbone, whose top is top."""
    eval_batch_size = 64  # the stages' convolutions ran 1.9x slower per image in batches of 256

    def __init__(self, data, config, top, classifier, device, extracted=0, kept_paths=None,
                 split_features=None):
        self.data, self.extracted, self.kept_paths = data, extracted, kept_paths
        self.split_features = split_features
        self.flip_maps = config.mirror != "off"
        self.batch_size, self.device = config.batch_size, device
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


def pretrained_top_features(top, by_split, device):
    """{split: (float16 features [N, D], ok)} of each image (not its mirror image) through the
    pretrained top, before it trains: the features the data check compares."""
    stages = StageModel(top, head=None)
    return {name: (stage_features(stages, activations[:, :1], device).half(), ok)
            for name, (activations, ok) in by_split.items()}


def readable_masks(splits):
    """Which images decode, per split, each rank checking its share: --strict with --finetune,
    where no feature pass has decoded them before training."""
    masks = {}
    for name, split in splits.items():
        mine = distributed.shard(range(len(split.paths)))
        shares = distributed.gather_objects({i: is_readable(split.paths[i]) for i in mine})
        readable = {index: ok for share in shares for index, ok in share.items()}
        masks[name] = torch.tensor([readable[i] for i in range(len(split.paths))], dtype=torch.bool)
    return masks


class ImageTask(Task):
    """Fine-tuning: batches of images, augmented on the fly, through backbone and head.
    `model` is the whole classifier, its chosen backbone stages unfrozen."""

    def __init__(self, config, backbone, splits, device, classifier):
        self.device, self.splits = device, splits
        self.batch_size, self.workers = config.batch_size, config.workers
        self.model = classifier
        classifier.unfreeze(config.finetune_layers)
        self.crop = backbone.preprocess.crop
        train = splits["train"]
        dataset = ImageFiles(train.paths, augment_transform(backbone.preprocess), self.crop,
                             train.labels)
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
            shuffle=True, seed=config.seed, drop_last=True)
        self.train_loader = image_loader(dataset, self.batch_size, self.workers, device,
                                         sampler=self.sampler)
        self.eval_transform = eval_transform(backbone.preprocess)
        self.warned = set()
        if config.strict:
            report_unreadable(splits, readable_masks(splits), strict=True)

    def train_batches(self, epoch):
        self.sampler.set_epoch(epoch)
        return self._readable(self.train_loader, "train")

    def eval_batches(self, split):
        split = self.splits[split]
        mine = distributed.shard(range(len(split.paths)))
        dataset = ImageFiles([split.paths[i] for i in mine], self.eval_transform, self.crop,
                             [split.labels[i] for i in mine])
        return self._readable(image_loader(dataset, self.batch_size, self.workers, self.device),
                              split.root.name)

    def steps_per_epoch(self):
        return len(self.train_loader)

    def train_labels(self):
        return torch.tensor(self.splits["train"].labels, dtype=torch.long)

    def eval_paths(self, split):
        """Known ahead only where every image decodes (_readable drops the others)."""
        return gathered_order(self.splits[split].paths)

    def _readable(self, loader, split):
        """The readable images of each batch; the others are warned about once per split
        (--strict checked them all before training)."""
        skipped = 0
        for images, labels, ok in loader:
            skipped += len(ok) - int(ok.sum())
            yield (images[ok].to(self.device, non_blocking=True,
                                 memory_format=torch.channels_last), labels[ok])
        skipped = sum(distributed.gather_objects(skipped))  # every rank reads its loader to the end
        if skipped and split not in self.warned:
            self.warned.add(split)
            warn(f"skipped {skipped} unreadable images in {split}/; --strict makes this an error")


class ScratchTask(Task):
    """Training the whole classifier from scratch on small images held in memory: every split
    decoded once into uint8 tensors on the training device (on a GPU no batch is ever copied;
    labels stay on the CPU, where the trainer gathers them); training batches shuffled, sharded
    across torchrun ranks and augmented whole; evaluation batches plain (the network averages
    each image with its mirror image itself). `model` is the classifier under
    training_autocast in evaluation too.

    The network's input size is chosen here, from the training images, so the backbone's
    preprocessing (what the checkpoint records for predict.py) is set here too."""

    def __init__(self, config, backbone, splits, device, classifier):
        started = time.perf_counter()
        size = scratch_cnn.input_size(splits["train"].paths)
        backbone.preprocess = Preprocess(size, size, scratch_cnn.MEAN, scratch_cnn.STD)
        self.preprocess, self.batch_size, self.device = backbone.preprocess, config.batch_size, device
        self.data, ok_masks, self.kept_paths = {}, {}, {}
        for name, split in splits.items():
            images, ok_masks[name] = scratch_cnn.decode_images(split.paths, size)
            self.data[name] = (images[ok_masks[name]].to(device),
                               torch.tensor(split.labels, dtype=torch.long)[ok_masks[name]])
            self.kept_paths[name] = [path for path, ok in zip(split.paths,
                                                              ok_masks[name].tolist()) if ok]
        report_unreadable(splits, ok_masks, config.strict)
        require_train_images(len(self.data["train"][1]), splits["train"])
        log(f"images decoded into memory at {size} px ({time.perf_counter() - started:.1f} s)")
        classifier.unfreeze(0)
        self.model = EvalAutocast(classifier.to(memory_format=torch.channels_last), device)

    def _normalize(self, images):
        return scratch_cnn.normalize(images, self.preprocess.mean, self.preprocess.std)

    def _train_order(self):
        """This rank's share of a random order, in whole batches: a last, smaller batch would
        upset BatchNorm."""
        count = len(self.data["train"][1])
        order = distributed.shard(torch.randperm(count))[:count // distributed.world_size()]
        return order[:max(len(order) // self.batch_size, 1) * self.batch_size]

    def train_batches(self, epoch):
        images, labels = self.data["train"]
        for batch in self._train_order().split(self.batch_size):
            yield (self._normalize(scratch_cnn.augment_batch(images[batch.to(self.device)])),
                   labels[batch])

    def eval_batches(self, split):
        images, labels = self.data[split]
        for batch in distributed.shard(torch.arange(len(labels))).split(scratch_cnn.EVAL_BATCH):
            yield self._normalize(images[batch.to(self.device)]), labels[batch]

    def steps_per_epoch(self):
        return max(len(self.data["train"][1]) // distributed.world_size() // self.batch_size, 1)

    def train_labels(self):
        return self.data["train"][1]

    def eval_paths(self, split):
        return gathered_order(self.kept_paths[split])


class EvalAutocast(torch.nn.Module):
    """model under training_autocast in evaluation too: bf16 on a CPU that computes it natively
    (on CUDA the trainer's evaluation autocast is the same)."""

    def __init__(self, model, device):
        super().__init__()
        self.model, self.device = model, device

    def forward(self, images):
        with training_autocast(self.device):
            return self.model(images)
