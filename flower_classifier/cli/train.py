"""train.py's command line: its flags, and --resume, become a TrainConfig for training.run.train.

    python train.py flowers --save_dir checkpoints      # the usage: train.py's docstring
"""
import argparse
from dataclasses import fields
from pathlib import Path

from flower_classifier.cli.options import (
    HelpFormatter,
    add_gpu_argument,
    add_threads_argument,
    category_names_from_flag,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    select_device,
    use_threads,
)
from flower_classifier.cli.runner import run_cli
from flower_classifier.data.loading import default_workers
from flower_classifier.data.split import DEFAULT_FRACTIONS, MANIFEST_NAME, parse_fractions
from flower_classifier.models.backbones import (
    BACKBONES,
    DEFAULT_ARCH,
    DEFAULT_TRAIN_STAGES,
    SCRATCH_ARCH,
)
from flower_classifier.models.checkpoint import load_train_state
from flower_classifier.models.classifier import FEATURE_TRANSFORMS
from flower_classifier.models.engines import ENGINE_CHOICES
from flower_classifier.models.features import default_cache_dir
from flower_classifier.training.config import (
    MIRROR_CHOICES,
    TrainConfig,
    family_default,
    saved_hyperparameters,
    unset_default,
)
from flower_classifier.training.optim import CLASS_WEIGHT_POWERS
from flower_classifier.training.run import train
from flower_classifier.utils import distributed
from flower_classifier.utils.console import log, warn
from flower_classifier.utils.errors import UserError
from flower_classifier.utils.files import new_run_folder


def arch_default(name):
    """The help text's default of a flag whose default depends on --arch (and, where it
    differs, on whether the backbone's last stages train, or on --finetune)."""
    head_alone, stages = family_default(name), family_default(name, "stages")
    finetune = family_default(name, "finetune")
    default = (f"default: {stages} where the backbone's last stages train, {head_alone} with "
               "--train_stages 0" if stages != head_alone else f"default: {head_alone}")
    if finetune != head_alone:
        default += f", {finetune} with --finetune"
    return f"{default}, with --arch {SCRATCH_ARCH} {family_default(name, 'scratch')}"


DEFAULT_SAVE_DIR = "runs/train"  # then runs/train2, runs/train3, ...


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Train an image classifier: a head on a frozen pretrained backbone, or with "
        "--arch cnn a small network trained from scratch.",
        formatter_class=HelpFormatter)
    parser.add_argument("data_dir", help="folder with train/ and valid/ (and optionally test/), "
                        "each holding one folder of images per class; or one folder of class "
                        "folders, split automatically (--split)")
    parser.add_argument("--save_dir", default=None, help="where checkpoint.pth and the reports go "
                        f"(created if missing; default: a new {DEFAULT_SAVE_DIR}, "
                        f"{DEFAULT_SAVE_DIR}2, ... per run, or with --resume the resumed run's "
                        "folder)")
    parser.add_argument("--arch", default=DEFAULT_ARCH, choices=list(BACKBONES), metavar="ARCH",
                        help=f"backbone: {DEFAULT_ARCH} is bundled and works offline; "
                        f"{SCRATCH_ARCH} is a small CNN for small images (such as CIFAR-10), "
                        "trained from scratch; the others download torchvision's weights once: "
                        + ", ".join(n for n in BACKBONES if n not in (DEFAULT_ARCH, SCRATCH_ARCH)))
    parser.add_argument("--learning_rate", type=positive_float, default=None,
                        help="learning rate of the head (of the whole network with --arch "
                        f"{SCRATCH_ARCH}, SGD with Nesterov momentum; "
                        f"{arch_default('learning_rate')})")
    parser.add_argument("--hidden_units", type=non_negative_int, default=None,
                        help="units of the head's hidden layer; 0 means a single linear layer "
                        f"({arch_default('hidden_units')})")
    parser.add_argument("--dropout", type=probability, default=None,
                        help="dropout probability after the hidden layer "
                        f"({arch_default('dropout')})")
    parser.add_argument("--weight_decay", type=probability, default=None,
                        help="weight decay of the optimiser, in [0, 1) "
                        f"({arch_default('weight_decay')})")
    parser.add_argument("--label_smoothing", type=probability, default=None,
                        help=f"label smoothing of the loss ({arch_default('label_smoothing')})")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help=f"training epochs ({arch_default('epochs')})")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help="images per training step (per process under torchrun; "
                        f"{arch_default('batch_size')})")
    parser.add_argument("--min_epoch_steps", type=non_negative_int, default=None,
                        help="training steps per epoch at the least: an epoch of a small "
                        "training set passes over it again until it has this many batches; "
                        "on cached features, not with --finetune or from scratch "
                        f"({arch_default('min_epoch_steps')})")
    add_gpu_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=family_default("seed"),
                        help="random seed: the same seed and --threads on the CPU give the same "
                        "weights")
    parser.add_argument("--mirror", choices=MIRROR_CHOICES, default=family_default("mirror"),
                        help="average each image's features with those of its mirror image: "
                        "'predict' for valid/, test/ and predictions, 'all' for train/ too "
                        "(doubles the backbone's work on train/; as accurate within the "
                        "cross-validation's error), 'off' never")
    parser.add_argument("--feature_transform", choices=FEATURE_TRANSFORMS, default=None,
                        help="what the head does first with the backbone's features: 'sqrt' "
                        "takes the signed square root of each (evens out a few large "
                        "activations; more accurate on new photos), 'none' uses them as they "
                        f"are ({arch_default('feature_transform')})")
    parser.add_argument("--augment", type=non_negative_int, default=family_default("augment"),
                        help="randomly augmented views of each training image, extracted once; "
                        "each epoch trains on one of them or the original")
    parser.add_argument("--category_names", default=None, help="JSON file mapping class folder "
                        "names to names, kept in the checkpoint and shown in the reports (default: "
                        "data_dir/cat_to_name.json when present)")
    parser.add_argument("--cache_dir", default=str(default_cache_dir()),
                        help="where backbone features are cached between runs")
    parser.add_argument("--no_cache", action="store_true", help="neither read nor write the "
                        "feature cache")
    parser.add_argument("--workers", type=non_negative_int, default=default_workers(),
                        help="processes decoding images")
    parser.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                        help="what computes the backbone features: auto takes OpenVINO on the "
                        "CPU (bf16 where the CPU has it natively) for 128 images or more or once "
                        "its converted model is on disk, else "
                        "torch; --finetune always trains with torch")
    parser.add_argument("--class_weights", choices=("auto", *CLASS_WEIGHT_POWERS), default=None,
                        help="weights of the classes in the loss: 'balanced' weighs each class "
                        "inversely to its training images (fairer to rare classes), 'sqrt' by "
                        "its square root, 'none' all alike; 'auto' is 'balanced' "
                        f"({arch_default('class_weights')})")
    parser.add_argument("--split", default=",".join(map(str, DEFAULT_FRACTIONS.values())),
                        metavar="FRACTIONS",
                        help="how a data_dir of class folders (no train/) is split: train, valid "
                        "and test fractions, decided per photo by a hash of its bytes; the split "
                        f"is kept in save_dir/{MANIFEST_NAME}, where later runs find it")
    parser.add_argument("--split_from", default=None, metavar="MANIFEST",
                        help="use the split a manifest records (a run's split_manifest.json, or "
                        "check_data.py --fix's cleaned_manifest.json) instead of splitting anew")
    parser.add_argument("--corrections", default=None, metavar="FILE",
                        help="apply the decisions of a corrections.json (studio.py): dropped "
                        "photos are left out, relabelled ones train under their new class, in "
                        "the split they are in")
    parser.add_argument("--no_data_check", dest="data_check", action="store_false",
                        help="skip the data check (duplicates, leaks between splits, likely "
                        "mislabelled photos) that runs on the features before training")
    parser.add_argument("--strict", action="store_true", help="stop on unreadable images "
                        "instead of skipping them with a warning")
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT",
                        help="continue an interrupted run from its checkpoint.pth or its folder "
                        "(reads the train_state.pth there)")
    parser.add_argument("--train_stages", type=non_negative_int, default=None,
                        help="train the backbone's last N stages with the head, on their input "
                        "activations computed once and cached, at --backbone_lr; 0 trains the "
                        "head alone on cached features (default: "
                        + ", ".join(f"{count} with {arch}"
                                    for arch, count in DEFAULT_TRAIN_STAGES.items())
                        + f": its last block and conv_head; 0 with other backbones, --finetune "
                        f"and --arch {SCRATCH_ARCH})")
    parser.add_argument("--no_fold_norms", dest="fold_norms", action="store_false",
                        help="with --train_stages: train the stages' batch norms on each batch's "
                        "statistics instead of folding them into their convolutions with the "
                        "pretrained statistics (folded: 0.3-0.5 points more accurate "
                        "cross-validated, 1.5x faster per step)")
    parser.add_argument("--no_whiten_stem", dest="whiten_stem", action="store_false",
                        help=f"with --arch {SCRATCH_ARCH}: train the first layer from random "
                        "filters instead of starting it whitening the training images' 2x2 "
                        "patches and keeping it frozen (whitened: 0.6 points of valid accuracy "
                        "more on CIFAR-10, one seed, and a cheaper step)")
    finetune = parser.add_argument_group("fine-tuning (train the backbone too)")
    finetune.add_argument("--finetune", action="store_true",
                          help="unfreeze the backbone and train it with the head on images "
                          "augmented on the fly (slow without a GPU)")
    finetune.add_argument("--finetune_layers", type=non_negative_int,
                          default=family_default("finetune_layers"),
                          help="unfreeze only the backbone's last N stages; 0 means all")
    finetune.add_argument("--backbone_lr", type=positive_float, default=None,
                          help="learning rate of the backbone's trained stages (default: "
                          f"{family_default('backbone_lr')} with --finetune, "
                          f"{family_default('backbone_lr', 'stages')} with --train_stages)")
    finetune.add_argument("--warmup_epochs", type=non_negative_int, default=None,
                          help="epochs of linear learning-rate warm-up before the cosine decay "
                          f"({arch_default('warmup_epochs')})")
    finetune.add_argument("--compile", action="store_true",
                          help="compile the training step with torch.compile: about 30 s more "
                          "in the first epoch, then each epoch about 1.3x faster (measured on a "
                          "CPU); needs a C++ compiler; ignored without --finetune")
    return parser


def resumed_run(args, values):
    """The train state of the run --resume names; the run's saved hyperparameters replace the
    flags' values, with a warning for each flag given that the run does not follow."""
    state, state_path = load_train_state(args.resume)
    for name, saved in saved_hyperparameters(state["hyperparameters"]).items():
        given = values[name]
        if given not in (saved, unset_default(name)):
            warn(f"--resume continues the run as it was started: --{name} {saved}, not {given}; "
                 "train anew without --resume to change it")
        values[name] = saved
    if state["epoch_done"] >= values["epochs"]:
        raise UserError(f"{state_path}: that run already finished all {values['epochs']} epochs; "
                        "nothing to resume")
    log(f"resuming {state_path} after epoch {state['epoch_done']} of {values['epochs']}")
    return state


def config_from_args(args):
    """(TrainConfig, the train state to resume or None) from the parsed flags."""
    values = {item.name: getattr(args, item.name) for item in fields(TrainConfig)}
    values["cache_dir"] = None if args.no_cache else args.cache_dir
    values["split"] = tuple(parse_fractions(args.split).values())
    if args.save_dir is None and args.resume:
        resumed_dir = Path(args.resume)
        values["save_dir"] = resumed_dir if resumed_dir.is_dir() else resumed_dir.parent
    elif args.save_dir is None:  # every rank saves in the folder rank 0 picked
        values["save_dir"] = distributed.gather_objects(
            new_run_folder(DEFAULT_SAVE_DIR) if distributed.is_main() else None)[0]
    category_names_from_flag(args.category_names)  # a bad file fails now, naming the fix
    resumed = resumed_run(args, values) if args.resume else None
    return TrainConfig(**values), resumed


def main(args):
    device = select_device(args.gpu)
    distributed.init_distributed(device)
    try:
        config, resumed = config_from_args(args)
        use_threads(config.threads)
        return train(config, device, resumed)
    finally:
        distributed.close_distributed()


def run(argv=None):
    """The console command (pyproject.toml), as `python train.py`."""
    run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":  # python -m flower_classifier.cli.train: the studio's final model
    run()
