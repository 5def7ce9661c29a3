"""What a training epoch iterates over: one Task per kind of training, made by make_task.

    task = make_task(config, classifier, splits, device)
    for inputs, labels in task.train_batches(epoch): ...   # inputs on device, labels on the CPU

FeatureTask: the head alone (--train_stages 0). The backbone is frozen, so each image's features
are computed once (models/features.py, cached on disk) and only the head trains, on slices of
those tensors.
StageTask: the default, --train_stages N. As FeatureTask, but what is cached is the input of the
backbone's last N stages, and those stages train with the head (models/stages.py).
ImageTask: --finetune. Images are decoded and augmented on the fly and go through the backbone,
whose chosen stages train with the head.
ScratchTask: --arch cnn. Small images decoded once into memory; the whole network trains.

Every task is made as Task(config, classifier, device, what it trains on).
"""
from flower_classifier.models.stages import split_backbone
from flower_classifier.training.tasks.cached import (
    FeatureTask,
    StageTask,
    extract_features,
    pretrained_top_features,
)
from flower_classifier.training.tasks.images import ImageTask, ScratchTask
from flower_classifier.utils import distributed
from flower_classifier.utils.console import warn
from flower_classifier.utils.errors import UserError


def make_task(config, classifier, splits, device):
    """The Task for this run: from scratch, fine-tuning or on cached features."""
    backbone = classifier.backbone_spec
    if not backbone.pretrained:
        for flag in ("finetune", "train_stages", "min_epoch_steps"):
            if getattr(config, flag):
                warn(f"--{flag} is ignored with --arch {config.arch}: the whole network trains "
                     "from scratch")
        return ScratchTask(config, classifier, device, splits)
    if config.finetune and config.train_stages:
        raise UserError("--finetune trains on images, --train_stages on cached activations; "
                        "choose one of them")
    if config.finetune and config.min_epoch_steps:
        warn("--min_epoch_steps is ignored with --finetune: it applies to training on cached "
             "features")
    if config.finetune:
        return ImageTask(config, classifier, device, splits)
    if config.train_stages:
        bottom, top = split_backbone(backbone, config.train_stages)
        cached = extract_features(config, backbone, device, splits, bottom=bottom)
        if config.data_check and distributed.is_main():
            cached.split_features = pretrained_top_features(top, cached.split_features, device)
        else:
            cached.split_features = None
        return StageTask(config, classifier, device, cached, top)
    return FeatureTask(config, classifier, device, extract_features(config, backbone, device,
                                                                    splits))
