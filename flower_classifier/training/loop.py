"""The epoch loop: train_one_epoch and evaluate, and the Trainer that keeps the best weights and
writes the checkpoint and train_state.pth as it goes.

    trainer = Trainer(config, classifier, task, device, class_to_idx)
    best, history = trainer.fit()                  # Ctrl-C saves the best so far, then re-raises
"""
import contextlib
import io
import sys
import time
from pathlib import Path

import torch
from torch import nn

from flower_classifier.models.checkpoint import (
    CHECKPOINT_NAME,
    TRAIN_STATE_NAME,
    make_checkpoint,
    make_train_state,
    restore_train_state,
    save_checkpoint,
)
from flower_classifier.models.engines import autocast
from flower_classifier.reports.evaluation import (
    CONFUSION_NAME,
    MISTAKES_NAME,
    MISTAKES_PAGE_NAME,
    REPORT_NAME,
)
from flower_classifier.reports.plots import epoch_rank
from flower_classifier.training.optim import make_criterion, make_optimizer
from flower_classifier.training.tasks.base import training_autocast
from flower_classifier.utils import distributed
from flower_classifier.utils.console import log, warn
from flower_classifier.utils.errors import UserError, error_reason
from flower_classifier.utils.files import atomic_write
from flower_classifier.utils.threads import ThreadPolicy

CURVES_NAME = "training_curves.png"
# Everything a run writes in its save folder.
RUN_FILES = (CHECKPOINT_NAME, TRAIN_STATE_NAME, CURVES_NAME, REPORT_NAME, CONFUSION_NAME,
             MISTAKES_NAME, MISTAKES_PAGE_NAME)
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

    def __init__(self, config, classifier, task, device, class_to_idx, split_record=None,
                 class_names=None):
        """task.model is what trains (on device); self.model wraps it for torchrun and
        compile, and task.model itself is what is evaluated, saved and restored. split_record:
        the automatic split's record for the checkpoint (data.split.manifest_record), None for
        a layout. class_names: {folder name: display name} for the checkpoint (None: none)."""
        self.config, self.classifier, self.task, self.device = config, classifier, task, device
        self.class_to_idx, self.split_record = class_to_idx, split_record
        self.class_names = class_names
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
        # On the CPU the threads follow the free cores, read again after each epoch.
        self.threads = (ThreadPolicy(task.threads or config.threads) if device.type == "cpu"
                        else None)

    def checkpoint(self, best, calibration=None):
        """The checkpoint of the weights `best` (ImageClassifier.trained_weights() with epoch
        and metrics); calibration: what calibrate() returns, for the final checkpoint."""
        extra = {"split": self.split_record} if self.split_record else {}
        if self.class_names:
            extra["class_names"] = self.class_names
        return make_checkpoint(self.classifier.backbone_spec, self.class_to_idx,
                               head_spec(self.config), best,
                               hyperparameters=self.config.hyperparameters(), epoch=best["epoch"],
                               metrics=best["metrics"], **extra, **(calibration or {}))

    def resume(self, state):
        self.best, self.history, epochs_done = restore_train_state(
            state, self.task.model, self.optimizer, self.scheduler, self.scaler)
        self.start_epoch = epochs_done + 1
        self.earlier_run_kept = True

    def fit(self):
        """All epochs. On Ctrl-C or SIGTERM, save what the finished epochs left unsaved, say
        where the best head so far is, then re-raise; on any other error, save it too."""
        try:
            if self.threads:
                self.threads.apply()
            for epoch in range(self.start_epoch, self.config.epochs + 1):
                self.run_epoch(epoch)
                if self.threads:
                    self.threads.after()
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
        if best is None or epoch_rank(record) > epoch_rank(best["metrics"]):
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
