"""A backbone cut in two for --train_stages N: the frozen bottom computes, once per image, the
activations that enter its last N stages (cached like the features); the top (those stages and
the pooling) trains with the head on them each epoch.

    bottom, top = split_backbone(backbone, 2)     # EfficientNet-Lite0: up to blocks[5] | the rest
    activations = bottom(images)                  # [N, 192, 7, 7]
    features = top(activations)                   # [N, 1280], as backbone.model(images)

Only backbones whose stages run one after the other, then a pooling layer (Backbone.pool), can
be cut; the top's modules are the backbone's own, so training them trains the classifier.
Before training, fold_batch_norms(top) folds each batch norm into the convolution before it.
"""
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from flower_classifier.utils.errors import UserError


class Stages(nn.Module):
    """Backbone stages run in order, then the pooling (where given)."""

    def __init__(self, stages, pool=None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.pool = pool

    def forward(self, inputs):
        for stage in self.stages:
            for module in stage:
                inputs = module(inputs)
        return inputs if self.pool is None else self.pool(inputs)


def check_train_stages(backbone, layers):
    """A clear error where the backbone cannot be cut before its last `layers` stages."""
    stages = backbone.stages()
    if backbone.pool is None:
        raise UserError(f"--train_stages needs a backbone whose stages run one after the other "
                        f"(efficientnet_lite0); {backbone.name} has none: use --finetune, or "
                        "--train_stages 0")
    if not 0 < layers < len(stages):
        raise UserError(f"--train_stages {layers} is out of range: {backbone.name} has "
                        f"{len(stages)} stages, and the first stays frozen; choose 1 to "
                        f"{len(stages) - 1}")


def split_backbone(backbone, layers):
    """(bottom, top): the backbone's stages before its last `layers`, and those stages with the
    pooling."""
    check_train_stages(backbone, layers)
    stages = backbone.stages()
    return (Stages(stages[:-layers]).eval(),
            Stages(stages[-layers:], backbone.pool(backbone.model)))


class FoldedBatchNormAct2d(BatchNormAct2d):
    """A BatchNormAct2d folded into the convolution before it (fold_batch_norms): it adds its
    bias, then its activation. Its weights are a batch norm's with the identity's statistics,
    so they load into the unfolded backbone as they are."""

    def forward(self, inputs):
        return self.act(self.drop(inputs + self.bias.view(1, -1, 1, 1).to(inputs.dtype)))


@torch.no_grad()
def fold_batch_norms(stages):
    """Fold, in place, each BatchNormAct2d that follows a convolution without bias: the
    convolution's weights take the norm's scale, the norm keeps only its shift (scale 1, frozen;
    mean 0, variance 1 - eps) and becomes a FoldedBatchNormAct2d. Training then keeps the
    pretrained statistics instead of each batch's; a training step of EfficientNet-Lite0's last
    two stages, folded and on channels-last inputs, ran 1.46x faster than unfolded in the
    cache's layout (the batch norms' backward had been a third of it)."""
    for module in stages.modules():
        previous = None
        for child in module.children():
            if (type(child) is BatchNormAct2d and isinstance(previous, nn.Conv2d)
                    and previous.bias is None):
                scale = child.weight / torch.sqrt(child.running_var + child.eps)
                previous.weight.mul_(scale.view(-1, 1, 1, 1))
                child.bias.sub_(child.running_mean * scale)
                child.weight.fill_(1).requires_grad_(False)
                child.running_mean.zero_()
                child.running_var.fill_(1 - child.eps)
                child.__class__ = FoldedBatchNormAct2d
            previous = child
    return stages


class StageModel(nn.Module):
    """What --train_stages trains: the top of the backbone and the head, on cached activations.
    Inputs [N, C, H, W] (one view) or [N, V, C, H, W]: the views' features are averaged before
    the head, as ImageClassifier averages an image's with its mirror image's."""

    def __init__(self, top, head):
        super().__init__()
        self.top, self.head = top, head

    def features(self, activations):
        if activations.dim() == 5:  # [N, views, C, H, W]: the views' features averaged
            return self.features(activations.flatten(0, 1)).unflatten(
                0, activations.shape[:2]).mean(1)
        # Channels-last: evaluation 1.5x faster (float32, CPU); training steps, with the batch
        # norms folded, part of fold_batch_norms' 1.46x (unfolded, channels-last was 1.35x slower).
        return self.top(activations.contiguous(memory_format=torch.channels_last))

    def forward(self, activations):
        return self.head(self.features(activations))
