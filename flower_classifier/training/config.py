"""What one training run is: a frozen TrainConfig of hyperparameters and run options.

    from flower_classifier.training.config import TrainConfig
    config = TrainConfig("flowers", epochs=20, save_dir="checkpoints")
    config = config.resolved(from_scratch=False, default_stages=2)  # fill the defaults left at None
    config.hyperparameters()                        # what the checkpoint records

Hyperparameters define the model and its training: they are saved in checkpoints and train
states, and --resume takes them back. Where the families (a pretrained backbone with its last
stages trained, the head alone, --finetune, a network trained from scratch) want different
values, the field's default is None and their defaults stand in its metadata side by side;
`earlier` is what runs saved before the hyperparameter existed trained with. Adding a
hyperparameter is one field here and one flag in train.py.
"""
from dataclasses import dataclass, field, fields, replace

from flower_classifier.data.loading import default_workers
from flower_classifier.data.split import DEFAULT_FRACTIONS
from flower_classifier.models.backbones import DEFAULT_ARCH
from flower_classifier.models.features import default_cache_dir

MIRROR_CHOICES = ("predict", "all", "off")


def hyperparameter(default=None, *, pretrained=None, scratch=None, stages=None, finetune=None,
                   earlier=None):
    """A field saved in checkpoints. Give `default` when the families share it, else
    `pretrained` (the head alone) and `scratch`, and `stages` where training the backbone's
    last stages (--train_stages) or `finetune` where --finetune wants another value than the
    head alone (the field stays None until TrainConfig.resolved)."""
    family = None if pretrained is None else {
        "pretrained": pretrained, "scratch": scratch,
        "stages": pretrained if stages is None else stages,
        "finetune": pretrained if finetune is None else finetune}
    return field(default=default, metadata={"hyperparameter": True, "family": family,
                                            "earlier": earlier})


@dataclass(frozen=True)
class TrainConfig:
    """Everything train(config, device) needs; defaults chosen by cross-validation
    (benchmarks/quality.py for the pretrained family, benchmarks/cifar.py from scratch)."""
    data_dir: str
    # Hyperparameters.
    arch: str = hyperparameter(DEFAULT_ARCH)
    # The head alone: batches of 128 at 0.002 for 40 epochs tied 64 at 0.001 for 50 (two seeds
    # of folds, benchmarks/quality.py) in 40% of the steps; --finetune and the trained stages
    # keep what they had.
    learning_rate: float = hyperparameter(pretrained=0.002, scratch=0.2, stages=0.001,
                                          finetune=0.001)
    hidden_units: int = hyperparameter(pretrained=512, scratch=128)  # scratch: checkpoint < 5 MB
    dropout: float = hyperparameter(pretrained=0.5, scratch=0.2)
    # --arch cnn: 5e-3 and 10 epochs, with the whitened stem and 2-pixel shifts, score about as
    # 5e-4 and 15 epochs did, in two thirds of the time (benchmarks/README.md, "Small images").
    weight_decay: float = hyperparameter(pretrained=0.05, scratch=5e-3, earlier=1e-4)
    label_smoothing: float = hyperparameter(pretrained=0.1, scratch=0.1)
    epochs: int = hyperparameter(pretrained=40, scratch=10, stages=12, finetune=50)
    batch_size: int = hyperparameter(pretrained=128, scratch=512, stages=64, finetune=64)
    # On cached features, an epoch of a small training set passes over it again until it has
    # this many batches: in one pass, 5 photos per class of the flowers trained too few steps,
    # 2.5 points of valid accuracy short with the head alone, 7 with the trained stages. The
    # head tied from 25 to 50; the stages gained 1.2 points more at 80, for twice the time.
    # 40 keeps the whole flowers' epochs (46 and 92 batches) as cross-validated:
    # benchmarks/README.md, "Small training sets".
    min_epoch_steps: int = hyperparameter(pretrained=40, scratch=0, stages=40, finetune=0,
                                          earlier=0)
    warmup_epochs: int = hyperparameter(pretrained=1, scratch=2)
    feature_transform: str = hyperparameter(pretrained="sqrt", scratch="none", earlier="none")
    # Balanced loss weights: +1.8 points of mean per-class accuracy on unbalanced flowers,
    # +0.6 on the shared ones (benchmarks/class_weights.py); not measured from scratch.
    class_weights: str = hyperparameter(pretrained="auto", scratch="none", earlier="none")
    seed: int = hyperparameter(0)
    mirror: str = hyperparameter("predict", earlier="off")
    augment: int = hyperparameter(0)
    finetune: bool = hyperparameter(False)
    finetune_layers: int = hyperparameter(0)
    backbone_lr: float = hyperparameter(pretrained=1e-4, scratch=1e-4, stages=3e-4)
    # None: the backbone's default (backbones.DEFAULT_TRAIN_STAGES); 0 with --finetune and from
    # scratch.
    train_stages: int | None = hyperparameter(None, earlier=0)
    # --train_stages: the stages' batch norms folded into their convolutions (models/stages.py);
    # runs begun before the folding resume unfolded.
    fold_norms: bool = hyperparameter(True, earlier=False)
    # --arch cnn: the stem's filters whiten the training images' patches and stay frozen
    # (models/scratch_cnn.py); runs begun before it resume with their stem trained.
    whiten_stem: bool = hyperparameter(True, earlier=False)
    # Run options: where and how this run goes, not what it trains.
    save_dir: str = "."
    split: tuple = tuple(DEFAULT_FRACTIONS.values())  # train, valid[, test] of one folder
    split_from: str | None = None  # a split manifest to read instead
    corrections: str | None = None  # a studio's corrections.json, applied to the split
    data_check: bool = True
    category_names: str | None = None  # None: data_dir/cat_to_name.json when present
    cache_dir: str | None = field(default_factory=lambda: str(default_cache_dir()))  # None: none
    workers: int = field(default_factory=default_workers)
    engine: str = "auto"
    strict: bool = False
    compile: bool = False
    threads: int | None = None  # CPU threads; None: the free cores, read again each epoch

    def resolved(self, from_scratch, default_stages=0):
        """This config with the defaults left at None filled in: train_stages with
        default_stages (the backbone's), then each hyperparameter with its family's default."""
        stages = self.train_stages
        if stages is None:
            stages = 0 if from_scratch or self.finetune else default_stages
        family = ("scratch" if from_scratch else "stages" if stages
                  else "finetune" if self.finetune else "pretrained")
        return replace(self, train_stages=stages, **{
            item.name: item.metadata["family"][family] for item in hyperparameter_fields()
            if item.metadata["family"] and getattr(self, item.name) is None})

    def hyperparameters(self):
        """{name: value} of the hyperparameters, as checkpoints record them."""
        return {item.name: getattr(self, item.name) for item in hyperparameter_fields()}


def hyperparameter_fields():
    return [item for item in fields(TrainConfig) if item.metadata.get("hyperparameter")]


def hyperparameter_field(name):
    return next(item for item in hyperparameter_fields() if item.name == name)


def family_default(name, family="pretrained"):
    """A hyperparameter's default: the family's (pretrained, scratch, stages, finetune) where
    they differ."""
    item = hyperparameter_field(name)
    return item.metadata["family"][family] if item.metadata["family"] else item.default


def unset_default(name):
    """A hyperparameter's value when its flag is not given: None where the families differ
    (filled in by TrainConfig.resolved)."""
    return hyperparameter_field(name).default


def saved_hyperparameters(saved):
    """A checkpoint's hyperparameters, with the earlier value of those it predates."""
    return {item.name: saved.get(item.name, item.metadata["earlier"])
            for item in hyperparameter_fields()}
