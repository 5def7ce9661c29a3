"""Tasks on images decoded during training: fine-tuning (ImageTask, --finetune) and the small
network trained from scratch (ScratchTask, --arch cnn).

    task = ImageTask(config, classifier, device, splits)
"""
import time

import torch

from flower_classifier.data import small_images
from flower_classifier.data.images import is_readable
from flower_classifier.data.loading import ImageFiles, image_loader
from flower_classifier.data.transforms import augment_transform, eval_transform
from flower_classifier.models import scratch_cnn
from flower_classifier.models.backbones import Preprocess
from flower_classifier.training.tasks.base import (
    Task,
    gathered_order,
    report_unreadable,
    require_train_images,
    training_autocast,
)
from flower_classifier.utils import distributed
from flower_classifier.utils.console import log, warn


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

    def __init__(self, config, classifier, device, splits):
        backbone = classifier.backbone_spec
        self.device, self.splits = device, splits
        self.batch_size, self.workers = distributed.per_process(config.batch_size), config.workers
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

    def __init__(self, config, classifier, device, splits):
        started = time.perf_counter()
        size = small_images.input_size(splits["train"].paths)
        backbone = classifier.backbone_spec
        backbone.preprocess = Preprocess(size, size, scratch_cnn.MEAN, scratch_cnn.STD)
        self.preprocess, self.device = backbone.preprocess, device
        self.batch_size = distributed.per_process(config.batch_size)
        self.data, ok_masks, self.kept_paths = {}, {}, {}
        for name, split in splits.items():
            images, ok_masks[name] = small_images.decode_images(split.paths, size)
            self.data[name] = (images[ok_masks[name]].to(device),
                               torch.tensor(split.labels, dtype=torch.long)[ok_masks[name]])
            self.kept_paths[name] = [path for path, ok in zip(split.paths,
                                                              ok_masks[name].tolist()) if ok]
        report_unreadable(splits, ok_masks, config.strict)
        require_train_images(len(self.data["train"][1]), splits["train"])
        log(f"images decoded into memory at {size} px ({time.perf_counter() - started:.1f} s)")
        classifier.unfreeze(0)
        if config.whiten_stem:  # after unfreeze(0), which would train the stem again
            classifier.backbone.whiten_stem(self._normalize(self._whitening_sample()).float())
        self.model = EvalAutocast(classifier.to(memory_format=torch.channels_last), device)

    def _whitening_sample(self):
        """At most WHITENING_IMAGES training images spread over the split, which is in class
        order: every class's colours, not the first classes' alone."""
        images = self.data["train"][0]
        step = max(1, len(images) // scratch_cnn.WHITENING_IMAGES)
        return images[::step][:scratch_cnn.WHITENING_IMAGES]

    def _normalize(self, images):
        return small_images.normalize(images, self.preprocess.mean, self.preprocess.std)

    def _train_order(self):
        """This rank's share of a random order, in whole batches: a last, smaller batch would
        upset BatchNorm."""
        count = len(self.data["train"][1])
        order = distributed.shard(torch.randperm(count))[:count // distributed.world_size()]
        return order[:max(len(order) // self.batch_size, 1) * self.batch_size]

    def train_batches(self, epoch):
        images, labels = self.data["train"]
        for batch in self._train_order().split(self.batch_size):
            yield (self._normalize(small_images.augment_batch(images[batch.to(self.device)])),
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
