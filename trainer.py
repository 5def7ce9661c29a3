"""The training library: train(config, device) runs one training run and returns its figures.

    from train_config import TrainConfig
    from trainer import train
    result = train(TrainConfig("flowers", save_dir="run"), torch.device("cpu"))
    result["checkpoint"], result["valid_accuracy"], result["test_accuracy"]

One run: find the splits, build the backbone and a new head, make the Task (tasks.py), train
epoch by epoch keeping the best weights (Trainer), calibrate on valid/, write the checkpoint,
then test and report. train.py is its command line.
"""
import contextlib
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
from backbones import DEFAULT_ARCH, DEFAULT_TRAIN_STAGES, build_backbone
from calibration import (
    DEFAULT_PASS_RATE,
    class_means,
    fit_temperature,
    nearest_similarity,
    pass_threshold,
)
from common import UserError, atomic_write, error_reason, log, warn
from data_utils import display_names, load_category_names
from datacheck import check_dataset, summary_lines
from engines import autocast
from model_utils import (
    CHECKPOINT_NAME,
    TRAIN_STATE_NAME,
    ImageClassifier,
    build_head,
    checkpoint_preprocess,
    make_checkpoint,
    make_train_state,
    restore_train_state,
    save_checkpoint,
)
from splits import (
    MANIFEST_NAME,
    SPLIT_NAMES,
    load_dataset,
    manifest_record,
    read_manifest,
    write_manifest,
)
from tasks import make_task, training_autocast

# Everything a run writes in its save folder.
RUN_FILES = (CHECKPOINT_NAME, TRAIN_STATE_NAME, "training_curves.png", "test_report.json",
             "confusion_matrix.png", "mistakes.png")
# --class_weights: each class weighted by (its training images)^-power.
CLASS_WEIGHT_POWERS = {"none": 0.0, "sqrt": 0.5, "balanced": 1.0}
# What 'auto' means. benchmarks/class_weights.py, 5 folds on flowers train+valid keeping 10-100%
# of each class: mean per-class accuracy none 91.90%, sqrt 93.67%, balanced 93.70% (+1.80 +-
# 0.35 points); on all of train+valid (3 folds) balanced +0.58 +- 0.07, the same accuracy.
AUTO_CLASS_WEIGHTS = "balanced"
# Seconds between writes of the checkpoint and train_state.pth during training on cached
# features (see Trainer.keep_train_state): a kill -9 loses at most this much training plus the
# epoch under way, Ctrl-C nothing.
SAVE_INTERVAL = 10


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


def load_backbone(arch):
    """build_backbone, naming the offline alternative when a download fails."""
    try:
        return build_backbone(arch)
    except UserError as error:
        if arch == DEFAULT_ARCH:
            raise
        raise UserError(f"{error}; or use --arch {DEFAULT_ARCH}, which is bundled and works "
                        "offline") from None


def make_optimizer(config, model, steps_per_epoch):
    """AdamW on what the ImageClassifier trains (the unfrozen backbone at backbone_lr), with
    linear warm-up then cosine decay per step; a network trained from scratch: SGD, all of it at
    learning_rate."""
    if model.backbone_spec.pretrained:
        groups = model.parameter_groups(config.learning_rate, config.backbone_lr)
        # fused: one kernel for all parameters; on the CPU it took the head's epoch from 0.57 to
        # 0.36 s (the per-tensor loop was a third of the step).
        optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=True)
    else:
        optimizer = scratch_cnn.sgd(model.parameters(), config.learning_rate, config.weight_decay)
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(config.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(labels, class_count, mode):
    """Loss weights per class [class_count] from the training labels: each class weighted by
    (its image count)^-power, power CLASS_WEIGHT_POWERS[mode] ('balanced': inverse frequency,
    'sqrt': its square root, 'none': all 1; 'auto': AUTO_CLASS_WEIGHTS, chosen by
    benchmarks/class_weights.py), scaled so the mean weight over the images is 1 (the loss
    and the learning rate keep their scale). A class with no image gets weight 0."""
    power = CLASS_WEIGHT_POWERS[AUTO_CLASS_WEIGHTS if mode == "auto" else mode]
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long),
                            minlength=class_count).double()
    weights = torch.where(counts > 0, counts.clamp(min=1) ** -power, torch.zeros_like(counts))
    return (weights * counts.sum() / (weights * counts).sum()).float()


def make_criterion(config, train_labels, class_count, device):
    """The training loss: cross-entropy with label smoothing, each class weighted as
    config.class_weights says (from the training labels)."""
    weights = class_weights(train_labels, class_count, config.class_weights)
    return nn.CrossEntropyLoss(weight=weights.to(device), label_smoothing=config.label_smoothing)


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


def wrap_for_training(model, config, device):
    """DistributedDataParallel under torchrun, then torch.compile with compile and finetune."""
    if distributed.world_size() > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile and config.finetune:
        return torch.compile(model)
    if config.compile:
        warn("--compile is ignored without --finetune: it pays only where images go through "
             "the backbone every epoch")
    return model


def head_spec(config):
    """The head's shape as build_head takes it and the checkpoint records it."""
    return {"hidden_units": config.hidden_units, "dropout": config.dropout,
            "feature_transform": config.feature_transform}


class Trainer:
    """The epoch loop: train, validate, keep the best weights, save what a resume needs.

    The checkpoint and train_state.pth are written after the last epoch, on Ctrl-C or an error,
    and in between at most every SAVE_INTERVAL seconds (every epoch when fine-tuning).
    Checkpoints written during training carry no calibration: predictions from one are
    uncalibrated and have no unknown verdict until train() writes the final checkpoint."""

    def __init__(self, config, classifier, task, device, backbone, class_to_idx, split=None):
        """task.model is what trains (on device); self.model wraps it for torchrun and
        compile, and task.model itself is what is evaluated, saved and restored. split: the
        automatic split's record for the checkpoint (splits.manifest_record), None for a layout."""
        self.config, self.classifier, self.task, self.device = config, classifier, task, device
        self.backbone, self.class_to_idx, self.split = backbone, class_to_idx, split
        self.save_dir = Path(config.save_dir)
        self.model = wrap_for_training(task.model.to(device), config, device)
        self.optimizer, self.scheduler = make_optimizer(config, classifier, task.steps_per_epoch())
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda"
                                           and not torch.cuda.is_bf16_supported())
        self.criterion = make_criterion(config, task.train_labels(), len(class_to_idx), device)
        self.best, self.history, self.start_epoch = None, [], 1
        self.best_saved = True
        self.unsaved_state = None  # a train state dict, or its bytes, not yet written
        self.saved_at = time.monotonic()
        self.earlier_run_kept = False  # a resumed run continues its own files

    def checkpoint(self, best, calibration=None):
        """The checkpoint of the weights `best` (ImageClassifier.trained_weights() with epoch
        and metrics); calibration: what calibrate() returns, for the final checkpoint."""
        split = {"split": self.split} if self.split else {}
        return make_checkpoint(self.backbone, self.class_to_idx, head_spec(self.config), best,
                               hyperparameters=self.config.hyperparameters(), epoch=best["epoch"],
                               metrics=best["metrics"], **split, **(calibration or {}))

    def resume(self, state):
        self.best, self.history, epochs_done = restore_train_state(
            state, self.task.model, self.optimizer, self.scheduler, self.scaler)
        self.start_epoch = epochs_done + 1
        self.earlier_run_kept = True

    def fit(self):
        """All epochs. On Ctrl-C or SIGTERM, save what the finished epochs left unsaved, say
        where the best head so far is, then re-raise; on any other error, save it too."""
        try:
            for epoch in range(self.start_epoch, self.config.epochs + 1):
                self.run_epoch(epoch)
        except Exception:
            if distributed.is_main():
                with contextlib.suppress(Exception):  # the first error is the one to report
                    self.save()
            raise
        except KeyboardInterrupt:
            if distributed.is_main():
                self.save()
                self.report_interrupt()
            raise
        return self.best, self.history

    def report_interrupt(self):
        saved = self.save_dir / CHECKPOINT_NAME
        resumable = (self.save_dir / TRAIN_STATE_NAME).is_file()
        print(f"interrupted: the best head so far (epoch {self.best['epoch']}, valid accuracy "
              f"{self.best['metrics']['valid_accuracy']:.2%}) is saved in {saved}"
              + (f"; continue with --resume {saved}" if resumable else "")
              if self.best else "interrupted before the first epoch ended: nothing was saved",
              file=sys.stderr, flush=True)

    def run_epoch(self, epoch):
        torch.manual_seed(self.config.seed + epoch)  # each epoch's randomness, the same resumed
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
        log(f"epoch {epoch:3d}/{self.config.epochs}  train loss {train_loss:.4f}  valid loss "
            f"{valid['loss']:.4f}  valid accuracy {valid['accuracy']:.2%}  "
            f"{record['seconds']:.1f} s")

    def keep_train_state(self, epoch):
        """The state after this epoch, written at once after the last epoch, after each epoch of
        fine-tuning (large states, long epochs), and when SAVE_INTERVAL seconds have passed since
        the last write; else kept serialised in memory for the next write (an interrupt's too).
        Epochs on cached features take a fraction of a second, and writing two files after each
        one took longer than the epochs."""
        state = make_train_state(self.checkpoint(self.best), self.task.model, self.optimizer,
                                 self.scheduler, self.scaler, epoch, self.history)
        if (epoch == self.config.epochs or self.config.finetune
                or time.monotonic() - self.saved_at >= SAVE_INTERVAL):
            self.unsaved_state = state  # kept until written: an interrupt mid-write writes it again
            self.save()
        else:
            serialised = io.BytesIO()
            torch.save(state, serialised)  # a copy: training goes on changing the tensors
            self.unsaved_state = serialised.getvalue()

    def save(self):
        """Write the best checkpoint and the kept train state where not written yet; a new run's
        first write sets an earlier run's files in save_dir aside first."""
        if self.best is None:
            return
        if not self.earlier_run_kept:
            keep_earlier_run(self.save_dir)
            self.earlier_run_kept = True
        if not self.best_saved:
            save_checkpoint(self.checkpoint(self.best), self.save_dir / CHECKPOINT_NAME)
            self.best_saved = True
        state = self.unsaved_state
        if isinstance(state, bytes):
            atomic_write(self.save_dir / TRAIN_STATE_NAME,
                         lambda temporary: temporary.write_bytes(state))
        elif state is not None:
            save_checkpoint(state, self.save_dir / TRAIN_STATE_NAME)
        self.unsaved_state = None
        self.saved_at = time.monotonic()


def class_display_names(config, class_to_idx):
    """Flower names for the report where a category names file has them, else folder names."""
    path = config.category_names or Path(config.data_dir) / "cat_to_name.json"
    names = load_category_names(path) if config.category_names or Path(path).is_file() else {}
    return display_names(class_to_idx, names)


def calibrate(config, classifier, task, best, device):
    """What keeps predictions honest, from the best epoch: the temperature fitted on valid/
    and, on cached features, the class means and the similarity threshold of the unknown
    verdict (DEFAULT_PASS_RATE of valid/ passes). Checkpoint keys: see model_utils."""
    classifier.load_trained_weights(best)
    valid = evaluate(task.model, task.eval_batches("valid"), nn.CrossEntropyLoss(), device)
    train = task.frozen_features("train")
    calibration = {"mirror": config.mirror != "off" and train is not None,  # as valid/, test/
                   "temperature": fit_temperature(valid["logits"], valid["labels"])}
    if train is not None:
        means = class_means(*train, classifier.head[-1].out_features)
        calibration["class_means"] = means.half()
        calibration["unknown_threshold"] = pass_threshold(
            nearest_similarity(task.frozen_features("valid")[0], means), DEFAULT_PASS_RATE)
    log(f"temperature {calibration['temperature']:.3f}" + (
        f"; unknown below similarity {calibration['unknown_threshold']:.3f} to the nearest "
        f"class mean ({DEFAULT_PASS_RATE:.0%} of valid/ passes)"
        if "class_means" in calibration else ""))
    return calibration


def unknown_share(task, calibration):
    """The share of test images the unknown verdict flags, or None without a verdict."""
    if "class_means" not in calibration:
        return None
    similarity = nearest_similarity(task.frozen_features("test")[0], calibration["class_means"])
    return (similarity < calibration["unknown_threshold"]).float().mean().item()


def test_and_report(classifier, task, best, names, save_dir, device, calibration):
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
                                                    calibration["temperature"],
                                                    unknown_share(task, calibration)))
        reports.save_test_report(report, save_dir / "test_report.json")
        reports.plot_confusion_matrix(test["labels"].tolist(), test["predictions"].tolist(), names,
                                      save_dir / "confusion_matrix.png")
        log(reports.summarize_report(report))
        log(f"saved test_report.json and confusion_matrix.png in {save_dir}")
        review_mistakes(task, test, calibration["temperature"], names, save_dir)
    return test["accuracy"]


def review_mistakes(task, test, temperature, names, save_dir):
    """mistakes.png: the wrongly named test photos, worst first, for a person to look at;
    returns how many there are (None where the images' order is not known)."""
    paths = task.eval_paths("test")
    if paths is None or len(paths) != len(test["labels"]):
        return None  # fine-tuning skipped unreadable images: the order is not known
    probabilities = (test["logits"] / temperature).softmax(1)
    wrong = reports.plot_mistakes(paths, test["labels"].tolist(), probabilities.numpy(), names,
                                  save_dir / "mistakes.png")
    if wrong:
        log(f"saved mistakes.png in {save_dir}: the {wrong} wrongly named test photos, worst first")
    return wrong


def load_splits(config, save_dir):
    """(class_to_idx, splits, the split's record for the checkpoint or None): a train/valid/test
    layout as it is; a folder of class folders split automatically (the manifest written to
    save_dir; an earlier one there keeps its photos where they were), or as config.split_from
    records."""
    earlier = save_dir / MANIFEST_NAME
    previous = read_manifest(earlier) if earlier.is_file() and not config.split_from else None
    fractions = dict(zip(SPLIT_NAMES, config.split))
    class_to_idx, splits, manifest = load_dataset(config.data_dir, fractions, config.split_from,
                                                  previous)
    if manifest is None:
        return class_to_idx, splits, None
    if distributed.is_main():
        write_manifest(manifest, earlier)
    log(f"{config.data_dir} split automatically ({', '.join(splits)}); the split is kept in "
        f"{earlier}" if not config.split_from else f"split as {config.split_from} records")
    return class_to_idx, splits, manifest_record(manifest)


def run_data_check(config, class_to_idx, splits, task, save_dir):
    """The data check on the features training computed anyway (nothing to do where the
    backbone trains); its summary in the log, the full report in save_dir."""
    if not config.data_check or task.split_features is None or not distributed.is_main():
        return
    report = check_dataset(class_to_idx, splits, task.split_features, save_dir, config.cache_dir)
    log("\n".join(summary_lines(report, save_dir)))


def build_classifier(config, resumed, save_dir):
    """(config with its family defaults, backbone, classifier with a new head, class_to_idx,
    splits, split record)."""
    class_to_idx, splits, split = load_splits(config, save_dir)
    if resumed and resumed["class_to_idx"] != class_to_idx:
        raise UserError(f"the classes of {config.data_dir} differ from those of the run being "
                        "resumed; resume on the same data, or train anew without --resume")
    log(f"{len(class_to_idx)} classes; " + ", ".join(
        f"{name} {len(split.paths)} images" for name, split in splits.items()))
    torch.manual_seed(config.seed)  # before the backbone: one trained from scratch starts random
    backbone = load_backbone(config.arch)
    if resumed and backbone.pretrained:
        # Preprocessed as the run began (bilinear for one begun before the filter was recorded).
        backbone.preprocess = checkpoint_preprocess(resumed)
    config = config.resolved(from_scratch=not backbone.pretrained,
                             default_stages=DEFAULT_TRAIN_STAGES.get(backbone.name, 0))
    classifier = ImageClassifier(backbone, build_head(backbone.feature_dim, len(class_to_idx),
                                                      **head_spec(config)))
    return config, backbone, classifier, class_to_idx, splits, split


def train(config, device, resumed=None):
    """One training run; resumed: a train state (model_utils.load_train_state) to continue,
    whose hyperparameters config already holds. Returns the run's figures."""
    started = time.perf_counter()
    save_dir = prepare_save_dir(config.save_dir)
    config, backbone, classifier, class_to_idx, splits, split = build_classifier(
        config, resumed, save_dir)
    names = class_display_names(config, class_to_idx)
    task = make_task(config, backbone, splits, device, classifier)
    if backbone.pretrained and not config.finetune:
        log(f"features ready: {task.extracted} images through the backbone, the rest from the "
            f"cache ({time.perf_counter() - started:.1f} s)")
    run_data_check(config, class_to_idx, splits, task, save_dir)
    trainer = Trainer(config, classifier, task, device, backbone, class_to_idx, split)
    if resumed:
        trainer.resume(resumed)
    best, history = trainer.fit()
    calibration = calibrate(config, classifier, task, best, device)
    checkpoint_path = save_dir / CHECKPOINT_NAME
    if distributed.is_main():
        save_checkpoint(trainer.checkpoint(best, calibration), checkpoint_path)
        reports.plot_training_curves(history, save_dir / "training_curves.png")
        log(f"best epoch {best['epoch']}: valid accuracy "
            f"{best['metrics']['valid_accuracy']:.2%}; saved {checkpoint_path} "
            f"({checkpoint_path.stat().st_size / 1e6:.1f} MB) and training_curves.png")
    test_accuracy = None
    if "test" in splits:
        test_accuracy = test_and_report(classifier, task, best, names, save_dir, device,
                                        calibration)
    log(f"done in {time.perf_counter() - started:.1f} s")
    return {"checkpoint": checkpoint_path, "best_epoch": best["epoch"],
            "valid_accuracy": best["metrics"]["valid_accuracy"], "test_accuracy": test_accuracy,
            "extracted_images": task.extracted, "history": history}
