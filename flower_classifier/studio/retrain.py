"""The studio's quick retrain: the head alone on the cached features, with the decisions in
corrections.json applied, in a thread of the server; progress is polled through GET /api/runs.

    trainer = QuickTrainer(studio, torch.device("cpu"))
    trainer.start()            # {"id": 1, "status": "running", ...}
    trainer.runs_json()        # every run: epochs, valid accuracy, what changed, mistakes

It trains what train.py --train_stages 0 trains (training.config's head, optimiser, loss and
loop), on features made float32 and rooted once. SCHEDULES: "train" is train.py's own (its
cross-validated accuracy), "fast" larger batches at a higher rate for half the epochs (about
3x faster, 1.2 points less accurate cross-validated on the shared flowers:
benchmarks/README.md, "The studio's quick retrain").
"""
import logging
import threading
import time

import torch
from torch import nn

from flower_classifier.data.corrections import apply_corrections, load_corrections
from flower_classifier.models.classifier import ImageClassifier, SignedSqrt, build_head
from flower_classifier.serve.answers import BadRequest
from flower_classifier.training.config import TrainConfig
from flower_classifier.training.loop import evaluate, head_spec, train_one_epoch
from flower_classifier.training.optim import make_criterion, make_optimizer
from flower_classifier.training.tasks.cached import CachedInputs, FeatureTask
from flower_classifier.utils.errors import UserError

# The retrain's schedules (hyperparameters of TrainConfig over train.py's): studio.py --retrain.
SCHEDULES = {"train": {}, "fast": {"epochs": 20, "batch_size": 512, "learning_rate": 0.008}}
MISTAKES_SHOWN = 60


def quick_config(data_dir, **overrides):
    """train.py --train_stages 0's config for data_dir, with overrides of its hyperparameters."""
    config = TrainConfig(str(data_dir), cache_dir=None, workers=0, train_stages=0, **overrides)
    return config.resolved(from_scratch=False, default_stages=0)


def corrected_inputs(studio, decisions):
    """(CachedInputs of the studio's features with the decisions applied, {split: [photo ids]}
    of the rows kept, the counts of what the decisions changed)."""
    counts = {}
    dataset = apply_corrections(studio.dataset, decisions, counts)
    data, ids = {}, {}
    for name, split in dataset.splits.items():
        features, ok = studio.features[name]
        photos = [studio.photos[studio.by_path[str(path)]] for path in split.paths]
        keep = [index for index, photo in enumerate(photos) if ok[photo.row]]
        rows = torch.tensor([photos[index].row for index in keep], dtype=torch.long)
        inputs = features[rows] if len(rows) else torch.empty(0, studio.feature_dim)
        labels = torch.tensor([split.labels[index] for index in keep], dtype=torch.long)
        data[name] = (inputs[None] if name == "train" else inputs, labels)
        ids[name] = [photos[index].id for index in keep]
    if not len(data["train"][1]) or not len(data["valid"][1]):
        raise UserError("no readable photo is left in train/ or valid/; keep some")
    return CachedInputs(data), ids, counts


def mistakes_of(result, ids, shown=MISTAKES_SHOWN):
    """The valid photos the head names wrongly, the most confidently wrong first."""
    probabilities = result["logits"].softmax(1)
    wrong = (result["predictions"] != result["labels"]).nonzero()[:, 0].tolist()
    rows = [{"id": ids[i], "predicted": result["predictions"][i].item(),
             "probability": round(probabilities[i, result["predictions"][i]].item(), 4),
             "true_probability": round(probabilities[i, result["labels"][i]].item(), 4)}
            for i in wrong]
    return sorted(rows, key=lambda row: -row["probability"])[:shown]


def progress(run):
    """fit_head's on_epoch for a run record the page polls."""
    def on_epoch(epoch, loss, accuracy, best):
        run["history"].append({"epoch": epoch, "train_loss": round(loss, 4),
                               "valid_accuracy": accuracy})
        run["epoch"], run["valid_accuracy"] = epoch, best
    return on_epoch


def rooted(cached):
    """cached with float32 inputs, their signed square root taken once (the head's first layer,
    left out of the training): each epoch no longer converts nor roots every batch."""
    root = SignedSqrt()
    data = {name: (root(inputs.float()), labels) for name, (inputs, labels) in cached.data.items()}
    return CachedInputs(data, cached.extracted, cached.kept_paths, cached.split_features)


def fit_head(config, backbone, class_count, cached, device, on_epoch=None, keep_best=True):
    """Train a new head (train.py's, for config) on cached features as train.py --train_stages 0
    does (FeatureTask, make_optimizer, make_criterion, train_one_epoch, evaluate), keeping the
    epoch of best valid accuracy. on_epoch(epoch, train loss, valid accuracy, best so far) after
    each; keep_best=False keeps the last epoch instead (cross-validation scores it). Returns
    (the ImageClassifier with that head, its evaluation on valid)."""
    torch.manual_seed(config.seed)
    head = build_head(backbone.feature_dim, class_count, **head_spec(config))
    classifier = ImageClassifier(backbone, head)
    sqrt_first = isinstance(head[0], SignedSqrt)
    trained = head[1:] if sqrt_first else head  # the same modules, the root left out
    task = FeatureTask(config, classifier, device, rooted(cached) if sqrt_first else cached)
    task.model = trained.to(device)
    optimizer, scheduler = make_optimizer(config, classifier, task.steps_per_epoch())
    criterion = make_criterion(config, task.train_labels(), class_count, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    best = None
    for epoch in range(1, config.epochs + 1):
        torch.manual_seed(config.seed + epoch)
        trained.train()
        loss = train_one_epoch(trained, task.train_batches(epoch), optimizer, scheduler, scaler,
                               criterion, device)
        valid = evaluate(trained, task.eval_batches("valid"), nn.CrossEntropyLoss(), device)
        if best is None or valid["accuracy"] > best[0] or not keep_best:
            best = (valid["accuracy"], {k: v.clone() for k, v in head.state_dict().items()})
        if on_epoch:
            on_epoch(epoch, loss, valid["accuracy"], best[0])
    head.load_state_dict(best[1])
    return classifier, evaluate(trained, task.eval_batches("valid"), nn.CrossEntropyLoss(),
                                device)


class QuickTrainer:
    """One retrain at a time, in a thread; runs are kept in memory, newest last."""

    def __init__(self, studio, device, **overrides):
        self.studio, self.device, self.overrides = studio, device, overrides
        self.runs, self.lock, self.classifier = [], threading.Lock(), None

    def start(self):
        """Begin a retrain (409 while one runs); returns its run record."""
        with self.lock:
            if self.runs and self.runs[-1]["status"] == "running":
                raise BadRequest(409, "A retrain is already running; wait for its accuracy.")
            config = quick_config(self.studio.options.data_dir, **self.overrides)
            run = {"id": len(self.runs) + 1, "status": "running", "epoch": 0,
                   "epochs": config.epochs, "valid_accuracy": None, "history": [],
                   "changes": None, "mistakes": [], "error": None, "seconds": None,
                   "started": time.time()}
            self.runs.append(run)
        threading.Thread(target=self.train, args=(run, config), daemon=True,
                         name=f"retrain-{run['id']}").start()
        return dict(run)

    def runs_json(self):
        with self.lock:
            return [{**run, "history": list(run["history"])} for run in self.runs]

    def train(self, run, config):
        started = time.perf_counter()
        try:
            decisions = load_corrections(self.studio.corrections_path)
            cached, ids, counts = corrected_inputs(self.studio, decisions)
            run["changes"] = {**counts, "train": len(ids["train"]), "valid": len(ids["valid"])}
            classifier, valid = fit_head(config, self.studio.backbone, len(self.studio.classes),
                                         cached, self.device, progress(run))
            run["mistakes"] = mistakes_of(valid, ids["valid"])
            self.classifier = classifier
            run["status"] = "done"
        except UserError as error:
            run["status"], run["error"] = "failed", f"{error}."
        except Exception as error:  # a bug: said in one sentence, logged with its traceback
            logging.getLogger("uvicorn.error").exception("retrain %s failed", run["id"])
            run["status"], run["error"] = "failed", f"The retrain failed ({type(error).__name__})."
        finally:
            run["seconds"] = round(time.perf_counter() - started, 2)

    def heatmap_png(self, photo_id):
        """The Grad-CAM heatmap of the latest retrain's prediction for a photo, as PNG."""
        if self.classifier is None:
            raise BadRequest(409, "Retrain first: the heatmap explains the retrained head.")
        from flower_classifier.models.explain import heatmap_overlay_png

        return heatmap_overlay_png(self.classifier, self.studio.image_path(photo_id),
                                   self.studio.names)
