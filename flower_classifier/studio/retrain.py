"""The studio's runs: the head alone on the cached features, with the decisions in
corrections.json applied, in a thread of the server; progress is polled through GET /api/runs.

    trainer = QuickTrainer(studio, torch.device("cpu"))
    trainer.start_first()      # the folder as filed: train.py --train_stages 0's head
    trainer.start()            # a retrain with the decisions: {"id": 2, "status": "running", ...}
    trainer.wait(2)            # its record once ended: epochs, valid accuracy, what changed,
                               # per-class results, mistakes (trainer.runs_json(): every run)

The first run, when the studio opens, trains what train.py --train_stages 0 trains
(training.config's head, optimiser, loss and loop) on the folder as filed. A retrain continues
that head on the corrected data for a few epochs (SCHEDULES["warm"], the default) rather than
starting over ("full"): on the shared flowers its cross-validated accuracy is within a few
tenths of a point of train.py's, in a third of the time (benchmarks/README.md, "The studio's
quick retrain"). Runs are kept in runs.json in the save folder, so a restarted studio lists the
earlier ones.
"""
import json
import logging
import threading
import time

import torch
from torch import nn

from flower_classifier.data.corrections import apply_corrections, load_corrections
from flower_classifier.models.classifier import (
    ImageClassifier,
    SignedSqrt,
    build_head,
    weights_copy,
)
from flower_classifier.serve.answers import BadRequest
from flower_classifier.training.config import TrainConfig
from flower_classifier.training.loop import evaluate, head_spec, train_one_epoch
from flower_classifier.training.optim import make_criterion, make_optimizer
from flower_classifier.training.tasks.cached import CachedInputs, FeatureTask
from flower_classifier.utils.errors import UserError
from flower_classifier.utils.files import write_json
from flower_classifier.utils.threads import lower_priority

RUNS_NAME = "runs.json"
# studio.py --retrain: how a retrain trains (hyperparameters of TrainConfig over train.py's).
# "warm" continues the first run's head for 12 of train.py's epochs (benchmarks/studio_retrain.py
# cross-validated it: within 0.3 points of training from scratch with up to 1% of the labels
# fixed; a higher rate without warm-up jolted the trained head), "full" trains from scratch.
SCHEDULES = {"warm": {"epochs": 12}, "full": {}}
# A warm retrain sees each relabelled photo this many more times: the first run's head learnt
# its old label, and 12 epochs at train.py's rate unlearn it only in part (cross-validated in
# benchmarks/studio_retrain.py --oversample; "full" trains as train.py does, without it).
RELABELLED_REPEATS = 4
MISTAKES_SHOWN = 60
STOPPED = "The studio stopped before this run ended."
CONFUSIONS_SHOWN = 20


def quick_config(data_dir, **overrides):
    """train.py --train_stages 0's config for data_dir, with overrides of its hyperparameters."""
    config = TrainConfig(str(data_dir), cache_dir=None, workers=0, train_stages=0, **overrides)
    return config.resolved(from_scratch=False, default_stages=0)


def corrected_inputs(studio, decisions, relabelled_repeats=0, root=False):
    """(CachedInputs of the studio's train and valid features with the decisions applied,
    {split: [photo ids]} of the rows kept, the counts of what the decisions changed).
    relabelled_repeats: each relabelled train photo's row is repeated that many more times;
    root: the inputs through the head's signed square root, as fit_head would take it (no
    float16 copy beside the float32 one: at 50,000 photos a tenth of a gigabyte)."""
    counts = {}
    dataset = apply_corrections(studio.dataset, decisions, counts)
    data, ids = {}, {}
    for name in ("train", "valid"):
        split = dataset.splits[name]
        photos = studio.photos_of(split.paths)  # None: an added photo this studio has not read
        counts["added"] -= sum(photo is None for photo in photos)  # not trained on here
        keep = [index for index, photo in enumerate(photos)
                if photo is not None and studio.features[photo.split][1][photo.row]]
        if name == "train" and relabelled_repeats:
            keep += [index for index in keep if photos[index].label not in (
                None, split.labels[index])] * relabelled_repeats
        inputs = gathered_features(studio, [photos[index] for index in keep], root)
        labels = torch.tensor([split.labels[index] for index in keep], dtype=torch.long)
        data[name] = (inputs[None] if name == "train" else inputs, labels)
        ids[name] = list(dict.fromkeys(photos[index].id for index in keep))
    if not len(data["train"][1]) or not len(data["valid"][1]):
        raise UserError("no readable photo is left in train/ or valid/; keep some")
    return CachedInputs(data, rooted=root), ids, counts


def gathered_features(studio, photos, root=False, block=4096):
    """The features of photos (studio.state.Photo, of any split: an added new photo's are in
    NEW's), in their order; root: as float32 through SignedSqrt, `block` rows at a time."""
    first = next(iter(studio.features.values()))[0]
    inputs = torch.empty(len(photos), studio.feature_dim,
                         dtype=torch.float32 if root else first.dtype)
    for source in {photo.split for photo in photos}:
        positions = torch.tensor([index for index, photo in enumerate(photos)
                                  if photo.split == source])
        rows = torch.tensor([photos[index].row for index in positions.tolist()])
        for at, taken in zip(positions.split(block), rows.split(block)):
            features = studio.features[source][0][taken]
            inputs[at] = SignedSqrt()(features.float()) if root else features
    return inputs


def mistakes_of(result, ids, shown=MISTAKES_SHOWN):
    """The valid photos the head names wrongly, the most confidently wrong first."""
    probabilities = result["logits"].softmax(1)
    wrong = (result["predictions"] != result["labels"]).nonzero()[:, 0].tolist()
    rows = [{"id": ids[i], "predicted": result["predictions"][i].item(),
             "probability": round(probabilities[i, result["predictions"][i]].item(), 4),
             "true_probability": round(probabilities[i, result["labels"][i]].item(), 4)}
            for i in wrong]
    return sorted(rows, key=lambda row: -row["probability"])[:shown]


def ratios(numerators, denominators):
    """numerators / denominators rounded, None where a denominator is 0 (JSON's null)."""
    return [round(n / d, 4) if d else None
            for n, d in zip(numerators.tolist(), denominators.tolist())]


def class_results(result, ids, class_count, shown=CONFUSIONS_SHOWN):
    """Per-class recall and precision on valid ([class_count], None where a class has no photo
    or no prediction), and the most frequent confusions with their photos' ids."""
    labels, predictions = result["labels"], result["predictions"]
    confusion = torch.zeros(class_count, class_count, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    correct = confusion.diag()
    off_diagonal = confusion - torch.diag(correct)
    count, order = off_diagonal.flatten().sort(descending=True, stable=True)
    pairs = []
    for number, index in zip(count[:shown].tolist(), order[:shown].tolist()):
        if not number:
            break
        true, predicted = divmod(index, class_count)
        photos = ((labels == true) & (predictions == predicted)).nonzero()[:, 0].tolist()
        pairs.append({"true": true, "predicted": predicted, "count": number,
                      "ids": [ids[i] for i in photos]})
    return {"recall": ratios(correct, confusion.sum(1)),
            "precision": ratios(correct, confusion.sum(0)), "confusions": pairs}


class RunStopped(Exception):
    """The studio is stopping: the run ends after its current epoch."""


def progress(run, stopping):
    """fit_head's on_epoch for a run record the page polls: the epoch, the best accuracy so far
    and the seconds left at the pace of the epochs run; RunStopped once stopping is set."""
    started = time.perf_counter()

    def on_epoch(epoch, loss, accuracy, best):
        if stopping.is_set():
            raise RunStopped(STOPPED)
        run["history"].append({"epoch": epoch, "train_loss": round(loss, 4),
                               "valid_accuracy": accuracy})
        pace = (time.perf_counter() - started) / epoch
        run.update(epoch=epoch, valid_accuracy=best,
                   seconds_left=round(pace * (run["epochs"] - epoch), 1))
    return on_epoch


def rooted(cached, block=4096):
    """cached's train and valid inputs (what fit_head uses) as float32 with their signed square
    root taken once, `block` rows at a time into one new tensor each (no full-size temporary:
    at 50,000 photos each is a quarter of a gigabyte): each epoch no longer converts nor roots
    every batch."""
    root, data = SignedSqrt(), {}
    for name in ("train", "valid"):
        inputs, labels = cached.data[name]
        output = torch.empty(inputs.shape, dtype=torch.float32)
        for source, target in zip(inputs.flatten(0, -2).split(block),
                                  output.flatten(0, -2).split(block)):
            target.copy_(root(source.float()))
        data[name] = (output, labels)
    return CachedInputs(data, cached.extracted, cached.kept_paths, cached.split_features,
                        rooted=True)


def fit_head(config, backbone, class_count, cached, device, on_epoch=None, keep_best=True,
             init=None):
    """Train a head (train.py's, for config) on cached features as train.py --train_stages 0
    does (FeatureTask, make_optimizer, make_criterion, train_one_epoch, evaluate), keeping the
    epoch of best valid accuracy; init: the head's weights to start from (None: new ones).
    on_epoch(epoch, train loss, valid accuracy, best so far) after each; keep_best=False keeps
    the last epoch instead (cross-validation scores it). Returns (the ImageClassifier with that
    head, its evaluation on valid)."""
    torch.manual_seed(config.seed)
    head = build_head(backbone.feature_dim, class_count, **head_spec(config))
    if init is not None:
        head.load_state_dict(init)
    classifier = ImageClassifier(backbone, head)
    sqrt_first = isinstance(head[0], SignedSqrt)
    if cached.rooted and not sqrt_first:
        raise ValueError("rooted inputs given to a head without the signed square root")
    trained = head[1:] if sqrt_first else head  # the same modules, the root left out
    task = FeatureTask(config, classifier, device,
                       rooted(cached) if sqrt_first and not cached.rooted else cached)
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
            best = (valid["accuracy"], weights_copy(head))
        if on_epoch:
            on_epoch(epoch, loss, valid["accuracy"], best[0])
    head.load_state_dict(best[1])
    return classifier, evaluate(trained, task.eval_batches("valid"), nn.CrossEntropyLoss(),
                                device)


def earlier_runs(path):
    """The runs a studio saved before in runs.json ([] when none or unreadable), marked as
    earlier: their heads are gone with that process."""
    try:
        runs = json.loads(path.read_text(encoding="utf-8")).get("runs", [])
    except (OSError, ValueError, AttributeError):
        return []
    for run in runs:
        if run.get("status") == "running":
            run.update(status="failed", error=STOPPED)
        run["earlier"] = True
    return runs


class QuickTrainer:
    """One run at a time, in a thread; runs newest last, saved to runs.json. schedule: how a
    retrain trains (SCHEDULES)."""

    def __init__(self, studio, device, schedule="warm"):
        self.studio, self.device, self.schedule = studio, device, schedule
        self.path = studio.save_dir / RUNS_NAME
        self.runs, self.lock = earlier_runs(self.path), threading.Lock()
        self.latest = None  # (run id, classifier, TrainConfig) of the latest run that ended well
        self.first = None  # the first run's head weights: where a warm retrain starts
        self.first_done, self.stopping, self.thread = threading.Event(), threading.Event(), None

    def start_first(self):
        """Train the folder as filed (train.py's head from scratch): the accuracy the decisions
        are measured against, and the head a warm retrain continues."""
        return self.start(as_filed=True)

    def start(self, as_filed=False):
        """Begin a run (409 while one runs); returns its record."""
        with self.lock:
            if self.runs and self.runs[-1]["status"] == "running":
                raise BadRequest(409, "A run is still training; retrain when its accuracy is "
                                 "shown.")
            kind = "as filed" if as_filed else self.schedule
            config = quick_config(self.studio.options.data_dir,
                                  **({} if as_filed else SCHEDULES[self.schedule]))
            run = {"id": len(self.runs) + 1, "kind": kind, "status": "running", "epoch": 0,
                   "epochs": config.epochs, "valid_accuracy": None, "seconds_left": None,
                   "history": [], "changes": None, "mistakes": [], "classes": None,
                   "error": None, "seconds": None, "started": time.time()}
            self.runs.append(run)
            self.save()
            self.thread = threading.Thread(target=self.train, args=(run, config), daemon=True,
                                           name=f"retrain-{run['id']}")
            self.thread.start()
        return dict(run)

    def stop(self, timeout=60):
        """End the running run after its epoch and wait for it: a process leaving while torch
        computes in a thread is aborted."""
        self.stopping.set()
        self.first_done.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def runs_json(self):
        """Every run's record, as GET /api/runs sends them."""
        with self.lock:
            return self.snapshot()

    def wait(self, run_id, timeout=600):
        """The record of run_id once it has ended (saved to runs.json by then); TimeoutError
        past timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            run = next(run for run in self.runs_json() if run["id"] == run_id)
            if run["status"] != "running":
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not end in {timeout} s")
            time.sleep(0.02)

    def snapshot(self):
        """The runs as JSON data (with self.lock held)."""
        return [{**run, "history": list(run["history"])} for run in self.runs]

    def save(self):
        """runs.json, written atomically (with self.lock held); a full disk loses the listing,
        never a decision."""
        try:
            write_json({"runs": self.snapshot()}, self.path)
        except UserError as error:
            logging.getLogger("uvicorn.error").warning("runs not saved: %s", error)

    def train(self, run, config):
        """The run's thread: its outcome and runs.json change together, under the lock."""
        started, outcome = time.perf_counter(), {"status": "failed"}
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # as FeatureTask trains the head; requests keep the rest
        if run["kind"] == "as filed":
            lower_priority()  # nobody waits on the first run: requests and thumbnails go first
        try:
            self.fit(run, config)
            outcome["status"] = "done"
        except RunStopped:
            outcome["error"] = STOPPED
        except UserError as error:
            outcome["error"] = f"{error}."
        except Exception as error:  # a bug: said in one sentence, logged with its traceback
            logging.getLogger("uvicorn.error").exception("retrain %s failed", run["id"])
            outcome["error"] = f"The retrain failed ({type(error).__name__})."
        finally:
            with self.lock:
                run.update(outcome, seconds=round(time.perf_counter() - started, 2),
                           seconds_left=None)
                self.save()
            if run["kind"] == "as filed":
                self.first_done.set()

    def fit(self, run, config):
        """Train the run's head (from the first run's for a warm retrain) on the photos with the
        decisions applied, and fill its record."""
        init = None
        if run["kind"] == "warm":
            self.first_done.wait()
            if self.stopping.is_set():
                raise RunStopped(STOPPED)
            init = self.first
            if init is None:
                raise UserError("the first run failed, so there is no head to continue; start "
                                "studio.py with --retrain full")
        decisions = {} if run["kind"] == "as filed" else load_corrections(
            self.studio.corrections_path)
        repeats = RELABELLED_REPEATS if run["kind"] == "warm" else 0
        cached, ids, counts = corrected_inputs(self.studio, decisions, repeats,
                                               root=config.feature_transform == "sqrt")
        run["changes"] = {**counts, "train": len(ids["train"]), "valid": len(ids["valid"])}
        classes = len(self.studio.classes)
        classifier, valid = fit_head(config, self.studio.backbone, classes, cached, self.device,
                                     progress(run, self.stopping), init=init)
        run["mistakes"] = mistakes_of(valid, ids["valid"])
        run["classes"] = class_results(valid, ids["valid"], classes)
        self.latest = (run["id"], classifier, config)
        if run["kind"] == "as filed":
            self.first = weights_copy(classifier.head)

    def heatmap_png(self, photo_id):
        """The Grad-CAM heatmap of the latest run's prediction for a photo, as PNG."""
        if self.latest is None:
            raise BadRequest(409, "No run has ended yet; wait for the first run on the folder as "
                             "filed, then open the photo again.")
        from flower_classifier.models.explain import heatmap_overlay_png

        return heatmap_overlay_png(self.latest[1], self.studio.image_path(photo_id),
                                   self.studio.names)
