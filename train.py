"""Train an image classifier by transfer learning: a folder of labelled photos in, checkpoint.pth out.

    python train.py flowers
    python train.py flowers --save_dir checkpoints --arch vgg16 --learning_rate 0.001 \\
        --hidden_units 512 --epochs 20 --gpu
    python train.py flowers --resume checkpoints/checkpoint.pth      # after Ctrl-C or a crash
    torchrun --nproc_per_node 2 train.py flowers                      # several processes or GPUs

flowers/ holds train/ and valid/ (and optionally test/), each with one folder per class. The
backbone is frozen, so each image's features are computed once (and cached on disk) and only the
small head trains each epoch; --finetune trains the backbone too, on images augmented on the fly.
"""
import argparse
import contextlib
import hashlib
import io
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

import distributed
import reports
import scratch_cnn
from backbones import BACKBONES, DEFAULT_ARCH, SCRATCH_ARCH, build_backbone
from cli_utils import (
    CATEGORY_NAMES_FIX,
    HelpFormatter,
    about_flag,
    add_gpu_argument,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    run_cli,
    select_device,
)
from calibration import (
    DEFAULT_PASS_RATE,
    class_means,
    fit_temperature,
    nearest_similarity,
    pass_threshold,
)
from common import UserError, atomic_write, error_reason, warn
from data_utils import (
    ImageFiles,
    augment_transform,
    display_names,
    eval_transform,
    find_splits,
    is_readable,
    load_category_names,
)
from engines import ENGINE_CHOICES, autocast, training_autocast
from data_utils import default_workers, image_loader
from features import FeatureExtractor, default_cache_dir
from model_utils import (
    FEATURE_TRANSFORMS,
    ImageClassifier,
    build_head,
    checkpoint_preprocess,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)

CHECKPOINT_NAME = "checkpoint.pth"
TRAIN_STATE_NAME = "train_state.pth"
# Everything a run writes in --save_dir.
RUN_FILES = (CHECKPOINT_NAME, TRAIN_STATE_NAME, "training_curves.png", "test_report.json",
             "confusion_matrix.png")
# What defines the model and its training: saved in checkpoints, taken back by --resume.
HYPERPARAMETERS = ("arch", "learning_rate", "hidden_units", "dropout", "epochs", "batch_size",
                   "seed", "augment", "finetune", "finetune_layers", "backbone_lr",
                   "label_smoothing", "warmup_epochs", "weight_decay", "mirror",
                   "feature_transform")
# What runs saved before these hyperparameters existed trained with, for --resume.
EARLIER_HYPERPARAMETERS = {"weight_decay": 1e-4, "mirror": "off", "feature_transform": "none"}
# Seconds between writes of the checkpoint and train_state.pth during training on cached
# features (see Trainer.keep_train_state): a kill -9 loses at most this much training plus the
# epoch under way, Ctrl-C nothing.
SAVE_INTERVAL = 10
MIRROR_CHOICES = ("predict", "all", "off")
# Defaults of the flags left at None, for a pretrained backbone (chosen by cross-validation:
# benchmarks/quality.py); for a network trained from scratch they are
# scratch_cnn.TRAINING_DEFAULTS.
PRETRAINED_DEFAULTS = {"epochs": 50, "learning_rate": 0.001, "hidden_units": 512,
                       "dropout": 0.5, "weight_decay": 0.05, "batch_size": 64,
                       "warmup_epochs": 1, "label_smoothing": 0.1, "feature_transform": "sqrt"}


def arch_default(name):
    """The help text's default of a flag whose default depends on --arch."""
    return (f"default: {PRETRAINED_DEFAULTS[name]}, with --arch {SCRATCH_ARCH} "
            f"{scratch_cnn.TRAINING_DEFAULTS[name]}")


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Train an image classifier: a head on a frozen pretrained backbone, or with "
        "--arch cnn a small network trained from scratch.",
        formatter_class=HelpFormatter)
    parser.add_argument("data_dir", help="folder with train/ and valid/ (and optionally test/), "
                        "each holding one folder of images per class")
    parser.add_argument("--save_dir", default=None, help="where checkpoint.pth and the reports go "
                        "(created if missing; default: the current folder, or with --resume the "
                        "resumed run's folder)")
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
    add_gpu_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed on the "
                        "CPU gives the same weights")
    parser.add_argument("--mirror", choices=MIRROR_CHOICES, default="predict",
                        help="average each image's features with those of its mirror image: "
                        "'predict' for valid/, test/ and predictions, 'all' for train/ too "
                        "(doubles the backbone's work on train/; as accurate within the "
                        "cross-validation's error), 'off' never")
    parser.add_argument("--feature_transform", choices=FEATURE_TRANSFORMS, default=None,
                        help="what the head does first with the backbone's features: 'sqrt' "
                        "takes the signed square root of each (evens out a few large "
                        "activations; more accurate on new photos), 'none' uses them as they "
                        f"are ({arch_default('feature_transform')})")
    parser.add_argument("--augment", type=non_negative_int, default=0,
                        help="randomly augmented views of each training image, extracted once; "
                        "each epoch trains on one of them or the original")
    parser.add_argument("--category_names", default=None, help="JSON file mapping class folder "
                        "names to names for the test report (default: data_dir/cat_to_name.json "
                        "when present)")
    parser.add_argument("--cache_dir", default=str(default_cache_dir()),
                        help="where backbone features are cached between runs")
    parser.add_argument("--no_cache", action="store_true", help="neither read nor write the "
                        "feature cache")
    parser.add_argument("--workers", type=non_negative_int, default=default_workers(),
                        help="processes decoding images")
    parser.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                        help="what computes the backbone features: auto takes OpenVINO on the "
                        "CPU (bf16 where the CPU has it natively) for 128 images or more, else "
                        "torch; --finetune always trains with torch")
    parser.add_argument("--strict", action="store_true", help="stop on unreadable images "
                        "instead of skipping them with a warning")
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT",
                        help="continue an interrupted run from its checkpoint.pth (reads the "
                        "train_state.pth beside it)")
    finetune = parser.add_argument_group("fine-tuning (train the backbone too)")
    finetune.add_argument("--finetune", action="store_true",
                          help="unfreeze the backbone and train it with the head on images "
                          "augmented on the fly (slow without a GPU)")
    finetune.add_argument("--finetune_layers", type=non_negative_int, default=0,
                          help="unfreeze only the backbone's last N stages; 0 means all")
    finetune.add_argument("--backbone_lr", type=positive_float, default=1e-4,
                          help="learning rate of the unfrozen backbone")
    finetune.add_argument("--warmup_epochs", type=non_negative_int, default=None,
                          help="epochs of linear learning-rate warm-up before the cosine decay "
                          f"({arch_default('warmup_epochs')})")
    finetune.add_argument("--compile", action="store_true",
                          help="compile the training step with torch.compile: about 30 s more "
                          "in the first epoch, then each epoch about 1.3x faster (measured on a "
                          "CPU); needs a C++ compiler")
    return parser


def log(message):
    """Print on the main process only, so torchrun's N processes print one log."""
    if distributed.is_main():
        print(message, flush=True)


def prepare_save_dir(save_dir):
    """Create save_dir and prove it writable now, not after an hour of training."""
    save_dir = Path(save_dir)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".write_test_{distributed.rank()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to --save_dir {save_dir} ({error_reason(error)}); "
                        "choose a folder you can write to") from None
    return save_dir


def keep_earlier_run(save_dir):
    """Rename an earlier run's files in save_dir to NAME.previous.EXT, just before this run's
    first save: a new run in the same folder neither overwrites a trained model nor mixes its
    files with the earlier run's, and a run that fails before saving leaves them untouched."""
    kept = []
    for name in RUN_FILES:
        path = save_dir / name
        if path.is_file():
            try:
                path.replace(path.with_name(f"{path.stem}.previous{path.suffix}"))
            except OSError as error:
                raise UserError(f"cannot keep the earlier run's {path} ({error_reason(error)}); "
                                "choose another --save_dir") from None
            kept.append(name)
    if kept:
        log(f"kept the earlier run's {', '.join(kept)} in {save_dir} as *.previous.*")


def load_train_state(path, args):
    """The state saved after the last finished epoch; its hyperparameters replace args'."""
    path = Path(path)
    if ".previous" in path.name:
        raise UserError(f"--resume continues the run saved as checkpoint.pth and train_state.pth; "
                        f"to continue the earlier run kept in {path.name}, move it and "
                        "train_state.previous.pth to a folder of their own without .previous")
    state_path = path / TRAIN_STATE_NAME if path.is_dir() else path.with_name(TRAIN_STATE_NAME)
    if not state_path.is_file():
        raise UserError(f"nothing to resume: {state_path} not found (train.py writes it beside "
                        "checkpoint.pth during training); pass the checkpoint.pth of a run")
    state = load_checkpoint(state_path)
    if "optimizer_state" not in state:
        raise UserError(f"{state_path} holds no training state; pass the checkpoint.pth of a run")
    defaults = get_args_parser()
    for name in HYPERPARAMETERS:
        saved = state["hyperparameters"].get(name, EARLIER_HYPERPARAMETERS.get(name))
        given = getattr(args, name)
        if given not in (saved, defaults.get_default(name)):
            warn(f"--resume continues the run as it was started: --{name} {saved}, not {given}; "
                 "train anew without --resume to change it")
        setattr(args, name, saved)
    if state["epoch_done"] >= args.epochs:
        raise UserError(f"{state_path}: that run already finished all {args.epochs} epochs; "
                        "nothing to resume")
    log(f"resuming {state_path} after epoch {state['epoch_done']} of {args.epochs}")
    return state


def fill_defaults(args, from_scratch):
    """Give the flags left at None their default for the kind of backbone."""
    defaults = scratch_cnn.TRAINING_DEFAULTS if from_scratch else PRETRAINED_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def load_backbone(arch):
    """build_backbone, naming the offline alternative when a download fails."""
    if arch == DEFAULT_ARCH:
        return build_backbone(arch)
    with about_flag(f"or use --arch {DEFAULT_ARCH}, which is bundled and works offline"):
        return build_backbone(arch)


def view_seed(seed, view, path, root):
    """A stable per-image seed, so an augmented view is the same in every run and process."""
    name = f"{seed}:{view}:{Path(path).relative_to(root).as_posix()}"
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


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


def readable_masks(splits):
    """Which images decode, per split, each rank checking its share: --strict with --finetune,
    where no feature pass has decoded them before training."""
    masks = {}
    for name, split in splits.items():
        mine = range(distributed.rank(), len(split.paths), distributed.world_size())
        shares = distributed.gather_objects({i: is_readable(split.paths[i]) for i in mine})
        readable = {index: ok for share in shares for index, ok in share.items()}
        masks[name] = torch.tensor([readable[i] for i in range(len(split.paths))], dtype=torch.bool)
    return masks


def extract_features(args, backbone, device, splits):
    """Each split's features once (train: the original and --augment views), unreadable dropped."""
    extractor = FeatureExtractor(backbone, device,
                                 cache_dir=None if args.no_cache else args.cache_dir,
                                 batch_size=max(args.batch_size, 32), workers=args.workers,
                                 engine=args.engine,
                                 images=sum(len(split.paths) for split in splits.values()))
    clean = eval_transform(backbone.preprocess)
    features, ok_masks = {}, {}
    for name, split in splits.items():
        mirror = args.mirror == "all" or (args.mirror == "predict" and name != "train")
        features[name], ok_masks[name] = extractor.features(split.root, split.paths, clean,
                                                            description=name, mirror=mirror)
    train = splits["train"]
    views = [features["train"]]
    augment = augment_transform(backbone.preprocess)
    for view in range(1, args.augment + 1):
        seeds = [view_seed(args.seed, view, path, train.root) for path in train.paths]
        view_features, view_ok = extractor.features(
            train.root, train.paths, augment, seeds=seeds, view=f"augment {args.seed} {view}",
            description=f"train view {view}/{args.augment}", mirror=args.mirror == "all")
        views.append(view_features)
        ok_masks["train"] &= view_ok
    report_unreadable(splits, ok_masks, args.strict)
    data = {}
    for name, split in splits.items():
        keep = ok_masks[name]
        labels = torch.tensor(split.labels, dtype=torch.long)[keep]
        inputs = torch.stack(views)[:, keep] if name == "train" else features[name][keep]
        data[name] = (inputs, labels)
    # No readable image in valid/ is caught by Trainer.run_epoch, for --finetune too.
    if not len(data["train"][1]):
        raise UserError(f"no readable images in train/; check the files in {train.root}")
    return data, extractor.computed


class FeatureTask:
    """Head training on cached features: batches are slices of tensors, sharded across ranks.
    `model` is what trains and what the batches feed: the classifier's head."""

    def __init__(self, data, batch_size, classifier, device):
        self.data, self.batch_size, self.device = data, batch_size, device
        self.model = classifier.head
        if device.type == "cpu":
            # The head's small matrix products gain nothing from a second thread, and lose
            # much when another process holds a core: one epoch took 2.3 s on one thread and
            # 7-46 s on two, on the 2-core machine with other work running.
            torch.set_num_threads(1)

    def train_batches(self, epoch):
        views, labels = self.data["train"]
        count = len(labels)
        view_index = torch.randint(len(views), (count,))
        world = distributed.world_size()
        order = distributed.shard(torch.randperm(count))[:count // world]
        for batch in order.split(self.batch_size):
            yield views[view_index[batch], batch].float().to(self.device), labels[batch]

    def eval_batches(self, split):
        inputs, labels = self.data[split]
        mine = distributed.shard(torch.arange(len(labels)))
        for batch in mine.split(1024):
            yield inputs[batch].float().to(self.device), labels[batch]

    def steps_per_epoch(self):
        return math.ceil(len(self.data["train"][1]) // distributed.world_size() / self.batch_size)

    def frozen_features(self, split):
        """(backbone features, labels) of the split (train: the original view), for the
        unknown verdict."""
        features, labels = self.data[split]
        return (features[0] if split == "train" else features), labels


class ImageTask:
    """Fine-tuning: batches of images, augmented on the fly, through backbone and head.
    `model` is the whole classifier, its chosen backbone stages unfrozen."""

    def __init__(self, args, backbone, splits, device, classifier):
        self.device, self.args, self.splits = device, args, splits
        self.model = classifier
        classifier.unfreeze(args.finetune_layers)
        crop = backbone.preprocess.crop
        train = splits["train"]
        dataset = ImageFiles(train.paths, augment_transform(backbone.preprocess), crop,
                             train.labels)
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
            shuffle=True, seed=args.seed, drop_last=True)
        self.train_loader = image_loader(dataset, args.batch_size, args.workers, device,
                                         sampler=self.sampler)
        self.eval_transform = eval_transform(backbone.preprocess)
        self.crop = crop
        self.warned = set()
        if args.strict:
            report_unreadable(splits, readable_masks(splits), strict=True)

    def train_batches(self, epoch):
        self.sampler.set_epoch(epoch)
        return self._readable(self.train_loader, "train")

    def eval_batches(self, split):
        split = self.splits[split]
        mine = list(range(distributed.rank(), len(split.paths), distributed.world_size()))
        dataset = ImageFiles([split.paths[i] for i in mine], self.eval_transform, self.crop,
                             [split.labels[i] for i in mine])
        return self._readable(image_loader(dataset, self.args.batch_size, self.args.workers,
                                           self.device), split.root.name)

    def steps_per_epoch(self):
        return len(self.train_loader)

    def frozen_features(self, split):
        """None: the backbone trains, so there are no fixed features for the unknown verdict."""
        return None

    def _readable(self, loader, split):
        """The readable images of each batch; the others are warned about once per split."""
        skipped = 0
        for images, labels, ok in loader:
            skipped += len(ok) - int(ok.sum())
            yield (images[ok].to(self.device, non_blocking=True,
                                 memory_format=torch.channels_last), labels[ok])
        skipped = sum(distributed.gather_objects(skipped))  # every rank reads its loader to the end
        if skipped and split not in self.warned:
            self.warned.add(split)
            warn(f"skipped {skipped} unreadable images in {split}/; --strict makes this an error")


def make_optimizer(args, model, steps_per_epoch):
    """AdamW on what the ImageClassifier trains (the unfrozen backbone at --backbone_lr), with
    linear warm-up then cosine decay per step; a network trained from scratch: SGD, all of it at
    --learning_rate."""
    if model.backbone_spec.pretrained:
        groups = model.parameter_groups(args.learning_rate, args.backbone_lr)
        # fused: one kernel for all parameters; on the CPU it took the head's epoch from 0.57 to
        # 0.36 s (the per-tensor loop was a third of the step).
        optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=True)
    else:
        optimizer = scratch_cnn.sgd(model.parameters(), args.learning_rate, args.weight_decay)
    total = max(1, args.epochs * steps_per_epoch)
    warmup = min(args.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model, batches, optimizer, scheduler, scaler, criterion, device):
    """One pass over the training batches; returns the mean training loss over all ranks."""
    loss_sum, count = 0.0, 0
    for inputs, labels in batches:
        labels = labels.to(device, non_blocking=True)
        with training_autocast(device):
            loss = criterion(model(inputs).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.item() * len(labels)
        count += len(labels)
    totals = distributed.gather_objects((loss_sum, count))
    return sum(t[0] for t in totals) / max(1, sum(t[1] for t in totals))


@torch.inference_mode()
def evaluate(model, batches, criterion, device):
    """Loss, accuracy, and every image's true and predicted class, over all ranks' shares."""
    model.eval()
    loss_sum, labels_seen, logits_seen = 0.0, [], []
    for inputs, labels in batches:
        with autocast(device):
            logits = model(inputs).float()
        loss_sum += criterion(logits, labels.to(device)).item() * len(labels)
        labels_seen.append(labels)
        logits_seen.append(logits.cpu())
    shares = distributed.gather_objects((loss_sum, torch.cat(labels_seen) if labels_seen else
                                         torch.empty(0, dtype=torch.long),
                                         torch.cat(logits_seen) if logits_seen else
                                         torch.empty(0, 0)))
    labels = torch.cat([share[1] for share in shares])
    logits = torch.cat([share[2] for share in shares if len(share[2])] or [torch.empty(0, 0)])
    predictions = logits.argmax(1) if len(logits) else torch.empty(0, dtype=torch.long)
    count = max(1, len(labels))
    return {"loss": sum(share[0] for share in shares) / count,
            "accuracy": (predictions == labels).sum().item() / count,
            "labels": labels, "predictions": predictions, "logits": logits}


def wrap_for_training(model, args, device):
    """DistributedDataParallel under torchrun, then torch.compile with --compile --finetune."""
    if distributed.world_size() > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile and args.finetune:
        return torch.compile(model)
    if args.compile:
        warn("--compile is ignored without --finetune: it pays only where images go through "
             "the backbone every epoch")
    return model


class Trainer:
    """The epoch loop: train, validate, keep the best weights, save what a resume needs."""

    def __init__(self, args, classifier, task, device, save_dir, checkpoint_of):
        """task.model is what trains (on device); self.model wraps it for torchrun and
        --compile, and task.model itself is what is evaluated, saved and restored."""
        self.args, self.classifier, self.task = args, classifier, task
        self.device, self.save_dir, self.checkpoint_of = device, save_dir, checkpoint_of
        self.model = wrap_for_training(task.model.to(device), args, device)
        self.optimizer, self.scheduler = make_optimizer(args, classifier, task.steps_per_epoch())
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda"
                                           and not torch.cuda.is_bf16_supported())
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.best, self.history, self.start_epoch = None, [], 1
        self.best_saved, self.train_state, self.saved_at = True, None, time.monotonic()
        self.earlier_run_kept = False  # a resumed run continues its own files

    def resume(self, state):
        self.task.model.load_state_dict(state["last_model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        if state["scaler_state"]:  # empty when saved with the scaler off (CPU, bf16)
            self.scaler.load_state_dict(state["scaler_state"])
        self.best = {key: state[key] for key in ("head_state", "backbone_state", "epoch", "metrics")}
        self.history, self.start_epoch = state["history"], state["epoch_done"] + 1
        self.earlier_run_kept = True

    def fit(self):
        """All epochs. On Ctrl-C or SIGTERM, save what the finished epochs left unsaved, say
        where the best head so far is, then re-raise; on any other error, save it too."""
        try:
            for epoch in range(self.start_epoch, self.args.epochs + 1):
                self.run_epoch(epoch)
        except Exception:
            if distributed.is_main():
                with contextlib.suppress(Exception):  # the first error is the one to report
                    self.save()
            raise
        except KeyboardInterrupt:
            if distributed.is_main():
                self.save()
                saved = self.save_dir / CHECKPOINT_NAME
                resumable = (self.save_dir / TRAIN_STATE_NAME).is_file()
                print(f"interrupted: the best head so far (epoch {self.best['epoch']}, valid "
                      f"accuracy {self.best['metrics']['valid_accuracy']:.2%}) is saved in "
                      f"{saved}" + (f"; continue with --resume {saved}" if resumable else "")
                      if self.best else "interrupted before the first epoch ended: nothing was "
                      "saved", file=sys.stderr, flush=True)
            raise
        return self.best, self.history

    def run_epoch(self, epoch):
        torch.manual_seed(self.args.seed + epoch)  # each epoch's randomness, the same when resumed
        started = time.perf_counter()
        self.task.model.train()
        train_loss = train_one_epoch(self.model, self.task.train_batches(epoch), self.optimizer,
                                     self.scheduler, self.scaler, self.criterion, self.device)
        valid = evaluate(self.task.model, self.task.eval_batches("valid"), self.criterion,
                         self.device)
        record = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid["loss"],
                  "valid_accuracy": valid["accuracy"], "seconds": time.perf_counter() - started}
        self.history.append(record)
        if not len(valid["labels"]):  # gathered: every rank stops alike
            raise UserError("no readable images in valid/; check its files")
        best = self.best
        if best is None or (valid["accuracy"], -valid["loss"]) > (
                best["metrics"]["valid_accuracy"], -best["metrics"]["valid_loss"]):
            self.best = {**self.classifier.trained_weights(), "epoch": epoch,
                         "metrics": {k: v for k, v in record.items() if k != "epoch"}}
            self.best_saved = False
        if distributed.is_main():
            self.keep_train_state(epoch)
        log(f"epoch {epoch:3d}/{self.args.epochs}  train loss {train_loss:.4f}  valid loss "
            f"{valid['loss']:.4f}  valid accuracy {valid['accuracy']:.2%}  "
            f"{record['seconds']:.1f} s")

    def keep_train_state(self, epoch):
        """The state after this epoch, written at once after the last epoch, after each epoch of
        fine-tuning (large states, long epochs), and when SAVE_INTERVAL seconds have passed since
        the last write; else kept serialised in memory for the next write (an interrupt's too).
        Epochs on cached features take a fraction of a second, and writing two files after each
        one took longer than the epochs."""
        state = {**self.checkpoint_of(self.best),
                 "last_model_state": self.task.model.state_dict(),
                 "optimizer_state": self.optimizer.state_dict(),
                 "scheduler_state": self.scheduler.state_dict(),
                 "scaler_state": self.scaler.state_dict(), "epoch_done": epoch,
                 "history": self.history}
        if (epoch == self.args.epochs or self.args.finetune
                or time.monotonic() - self.saved_at >= SAVE_INTERVAL):
            self.train_state = state  # kept until written: an interrupt mid-write writes it again
            self.save()
        else:
            serialised = io.BytesIO()
            torch.save(state, serialised)  # a copy: training goes on changing the tensors
            self.train_state = serialised.getvalue()

    def save(self):
        """Write the best checkpoint and the kept train state where not written yet; a new run's
        first write sets an earlier run's files in save_dir aside first."""
        if self.best is None:
            return
        if not self.earlier_run_kept:
            keep_earlier_run(self.save_dir)
            self.earlier_run_kept = True
        if not self.best_saved:
            save_checkpoint(self.checkpoint_of(self.best), self.save_dir / CHECKPOINT_NAME)
            self.best_saved = True
        kept = self.train_state
        if isinstance(kept, bytes):
            atomic_write(self.save_dir / TRAIN_STATE_NAME,
                         lambda temporary: temporary.write_bytes(kept))
        elif kept is not None:
            save_checkpoint(kept, self.save_dir / TRAIN_STATE_NAME)
        self.train_state = None
        self.saved_at = time.monotonic()


def class_display_names(args, class_to_idx):
    """Flower names for the report where a category names file has them, else folder names."""
    path = args.category_names or Path(args.data_dir) / "cat_to_name.json"
    with about_flag(CATEGORY_NAMES_FIX):
        names = load_category_names(path) if args.category_names or Path(path).is_file() else {}
    return display_names(class_to_idx, names)


def calibrate(args, classifier, task, best, device):
    """What keeps predictions honest, from the best epoch: the temperature fitted on valid/
    and, on cached features, the class means and the similarity threshold of the unknown
    verdict (DEFAULT_PASS_RATE of valid/ passes). Checkpoint keys: see model_utils."""
    classifier.load_trained_weights(best)
    valid = evaluate(task.model, task.eval_batches("valid"), nn.CrossEntropyLoss(), device)
    train = task.frozen_features("train")
    extras = {"mirror": args.mirror != "off" and train is not None,  # as valid/ and test/
              "temperature": fit_temperature(valid["logits"], valid["labels"])}
    if train is not None:
        means = class_means(*train, classifier.head[-1].out_features)
        extras["class_means"] = means.half()
        extras["unknown_threshold"] = pass_threshold(
            nearest_similarity(task.frozen_features("valid")[0], means), DEFAULT_PASS_RATE)
    log(f"temperature {extras['temperature']:.3f}" + (
        f"; unknown below similarity {extras['unknown_threshold']:.3f} to the nearest class "
        f"mean ({DEFAULT_PASS_RATE:.0%} of valid/ passes)" if "class_means" in extras else ""))
    return extras


def unknown_share(task, extras):
    """The share of test images the unknown verdict flags, or None without a verdict."""
    if "class_means" not in extras:
        return None
    similarity = nearest_similarity(task.frozen_features("test")[0], extras["class_means"])
    return (similarity < extras["unknown_threshold"]).float().mean().item()


def test_and_report(classifier, task, best, names, save_dir, device, extras):
    """Test accuracy of the best epoch, with curves, a report and a confusion matrix."""
    classifier.load_trained_weights(best)
    test = evaluate(task.model, task.eval_batches("test"), nn.CrossEntropyLoss(), device)
    if not len(test["labels"]):
        warn("no readable images in test/: no test accuracy or report")
        return None
    if distributed.is_main():
        report = reports.test_report(
            test["labels"].tolist(), test["predictions"].tolist(), names,
            calibration=reports.calibration_section(test["logits"], test["labels"],
                                                    extras["temperature"],
                                                    unknown_share(task, extras)))
        reports.save_test_report(report, save_dir / "test_report.json")
        reports.plot_confusion_matrix(test["labels"].tolist(), test["predictions"].tolist(), names,
                                      save_dir / "confusion_matrix.png")
        log(reports.summarize_report(report))
        log(f"saved test_report.json and confusion_matrix.png in {save_dir}")
    return test["accuracy"]


def main(args):
    device = select_device(args.gpu)
    distributed.init_distributed(device)
    try:
        return train(args, device)
    finally:
        distributed.close_distributed()


def train(args, device):
    started = time.perf_counter()
    if args.save_dir is None:
        resumed_dir = Path(args.resume) if args.resume else Path(".")
        args.save_dir = resumed_dir if resumed_dir.is_dir() else resumed_dir.parent
    save_dir = prepare_save_dir(args.save_dir)
    resumed = load_train_state(args.resume, args) if args.resume else None
    class_to_idx, splits = find_splits(args.data_dir)
    if resumed and resumed["class_to_idx"] != class_to_idx:
        raise UserError(f"the classes of {args.data_dir} differ from those of the run being "
                        "resumed; resume on the same data, or train anew without --resume")
    names = class_display_names(args, class_to_idx)
    log(f"{len(class_to_idx)} classes; " + ", ".join(
        f"{name} {len(split.paths)} images" for name, split in splits.items()))
    torch.manual_seed(args.seed)  # before the backbone: one trained from scratch starts random
    backbone = load_backbone(args.arch)
    if resumed and backbone.pretrained:
        # Preprocessed as the run began (bilinear for one begun before the filter was recorded).
        backbone.preprocess = checkpoint_preprocess(resumed)
    fill_defaults(args, from_scratch=not backbone.pretrained)
    head_spec = {"hidden_units": args.hidden_units, "dropout": args.dropout,
                 "feature_transform": args.feature_transform}
    classifier = ImageClassifier(backbone, build_head(backbone.feature_dim, len(class_to_idx),
                                                      **head_spec))
    if not backbone.pretrained:
        if args.finetune:
            warn(f"--finetune is ignored with --arch {args.arch}: the whole network trains "
                 "from scratch")
        task, computed = scratch_cnn.ScratchTask(args, backbone, splits, device, classifier), 0
        report_unreadable(splits, task.ok_masks, args.strict)
        log(f"images decoded into memory at {backbone.preprocess.crop} px "
            f"({time.perf_counter() - started:.1f} s)")
    elif args.finetune:
        task, computed = ImageTask(args, backbone, splits, device, classifier), 0
    else:
        data, computed = extract_features(args, backbone, device, splits)
        task = FeatureTask(data, args.batch_size, classifier, device)
        log(f"features ready: {computed} images through the backbone, the rest from the cache "
            f"({time.perf_counter() - started:.1f} s)")

    extras = {}  # calibration, filled in after training

    def checkpoint_of(best):
        return make_checkpoint(
            backbone, class_to_idx, head_spec, best,
            hyperparameters={name: getattr(args, name) for name in HYPERPARAMETERS},
            epoch=best["epoch"], metrics=best["metrics"], **extras)

    trainer = Trainer(args, classifier, task, device, save_dir, checkpoint_of)
    if resumed:
        trainer.resume(resumed)
    best, history = trainer.fit()
    extras.update(calibrate(args, classifier, task, best, device))
    checkpoint_path = save_dir / CHECKPOINT_NAME
    if distributed.is_main():
        save_checkpoint(checkpoint_of(best), checkpoint_path)
        reports.plot_training_curves(history, save_dir / "training_curves.png")
        log(f"best epoch {best['epoch']}: valid accuracy "
            f"{best['metrics']['valid_accuracy']:.2%}; saved {checkpoint_path} "
            f"({checkpoint_path.stat().st_size / 1e6:.1f} MB) and training_curves.png")
    test_accuracy = None
    if "test" in splits:
        test_accuracy = test_and_report(classifier, task, best, names, save_dir, device, extras)
    log(f"done in {time.perf_counter() - started:.1f} s")
    return {"checkpoint": checkpoint_path, "best_epoch": best["epoch"],
            "valid_accuracy": best["metrics"]["valid_accuracy"], "test_accuracy": test_accuracy,
            "extracted_images": computed, "history": history}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
