"""The Task contract the Trainer relies on, and what every kind of task shares.

    for inputs, labels in task.train_batches(epoch): ...   # inputs on device, labels on the CPU
"""
import torch

from flower_classifier.models import engines
from flower_classifier.utils import distributed
from flower_classifier.utils.console import warn
from flower_classifier.utils.errors import UserError


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
    extracted: how many images went through the backbone to build the task (for the log);
    requested: how many were asked for, from the cache or the backbone.
    split_features: {split: (features, ok)} of every image, what the data check compares;
        None where the backbone trains and features are not fixed.
    threads: the CPU threads its training steps take whatever --threads says, or None.
    """
    model: torch.nn.Module
    extracted: int = 0
    requested: int = 0
    split_features = None
    threads: int | None = None  # the CPU threads its steps want, None: the free cores

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
