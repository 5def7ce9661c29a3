"""The studio's quick retrain on the shared flowers: seconds per epoch of the head's loop as
train.py runs it and as a warm retrain runs it, the time from the click to the new valid accuracy
(QuickTrainer in-process, 100 decisions applied), and the cross-validated accuracy of a warm
retrain against train.py's head trained from scratch, after label fixes.

    python benchmarks/studio_retrain.py ../shared/data/flowers102

Features as train.py computes them (its FeatureExtractor, engine and cache: train/ the image's
features, valid/ and test/ averaged with the mirror image's). Cross-validation pools train/ and
valid/ (stratified folds, the last epoch scored on the held-out fold, as benchmarks/quality.py
does). In each fold a share of the training labels is first made wrong (--noise): the first run
trains on them, as the studio's first run trains on the folder as filed; then the labels are
fixed, as a person fixes them in the studio, and the warm retrain continues the first run's head
on the fixed labels, while the reference trains train.py's head from scratch on them.
"""
import argparse
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402

import quality  # noqa: E402
from flower_classifier.data.corrections import record_decisions  # noqa: E402
from flower_classifier.data.folders import find_splits  # noqa: E402
from flower_classifier.data.split import Dataset  # noqa: E402
from flower_classifier.data.transforms import eval_transform  # noqa: E402
from flower_classifier.models.backbones import build_backbone  # noqa: E402
from flower_classifier.models.classifier import (  # noqa: E402
    ImageClassifier,
    build_head,
    weights_copy,
)
from flower_classifier.studio.retrain import SCHEDULES as RETRAIN_SCHEDULES  # noqa: E402
from flower_classifier.studio.retrain import QuickTrainer, fit_head, quick_config  # noqa
from flower_classifier.studio.state import Studio, StudioOptions  # noqa: E402
from flower_classifier.training.loop import evaluate, head_spec, train_one_epoch  # noqa: E402
from flower_classifier.training.optim import make_criterion, make_optimizer  # noqa: E402
from flower_classifier.models.features import FeatureExtractor, split_features  # noqa: E402
from flower_classifier.training.tasks.cached import CachedInputs, FeatureTask  # noqa: E402

CPU = torch.device("cpu")


def features(args):
    """({split: (float16 features, ok)} as train.py computes them: train/ plain, valid/ and
    test/ averaged with the mirror image (--mirror predict), with its engine and feature cache;
    the Dataset)."""
    class_to_idx, splits = find_splits(args.data_dir)
    backbone = build_backbone("efficientnet_lite0")
    extractor = FeatureExtractor(backbone, CPU, cache_dir=args.cache_dir, workers=args.workers,
                                 images=sum(len(split.paths) for split in splits.values()))
    by_split = split_features(extractor, splits, eval_transform(backbone.preprocess))
    return by_split, Dataset(class_to_idx, splits), backbone


def made_wrong(labels, share, class_count, seed):
    """labels with a share of them moved to another class at random, and the mask of those."""
    generator = torch.Generator().manual_seed(seed)
    wrong = torch.rand(len(labels), generator=generator) < share
    shifts = torch.randint(1, class_count, (int(wrong.sum()),), generator=generator)
    noisy = labels.clone()
    noisy[wrong] = (labels[wrong] + shifts) % class_count
    return noisy, wrong


def cross_validate(args, backbone, by_split, dataset, share):
    """Per fold: the accuracy of train.py's head on the labels with `share` made wrong (the
    first run), of a warm retrain from it on the fixed labels, and of train.py's head trained
    from scratch on the fixed labels (the reference); last epochs scored on the held-out fold."""
    inputs = torch.cat([by_split[name][0] for name in ("train", "valid")])
    labels = torch.tensor([*dataset.splits["train"].labels, *dataset.splits["valid"].labels])
    class_count = len(dataset.class_to_idx)
    fold_of = quality.stratified_folds(labels, args.folds, args.seed)
    full = quick_config(args.data_dir, **RETRAIN_SCHEDULES["full"])
    warm = quick_config(args.data_dir, **RETRAIN_SCHEDULES["warm"])
    scores = {"first run": [], "warm retrain": [], "from scratch": []}

    def score(config, train_labels, held, init=None, fixed=None):
        train_inputs = inputs[~held]
        if fixed is not None and args.oversample:  # the fixed photos repeated
            train_inputs = torch.cat([train_inputs, train_inputs[fixed].repeat(
                args.oversample, 1)])
            train_labels = torch.cat([train_labels, train_labels[fixed].repeat(
                args.oversample)])
        cached = CachedInputs({"train": (train_inputs[None], train_labels),
                               "valid": (inputs[held], labels[held])})
        return fit_head(config, backbone, class_count, cached, CPU, keep_best=False, init=init)

    for fold in range(args.folds):
        held = fold_of == fold
        noisy, wrong = made_wrong(labels[~held], share, class_count, args.seed + 100 + fold)
        first, valid = score(full, noisy, held)
        scores["first run"].append(valid["accuracy"])
        init = weights_copy(first.head)
        scores["warm retrain"].append(score(warm, labels[~held], held, init,
                                            wrong)[1]["accuracy"])
        scores["from scratch"].append(score(full, labels[~held], held)[1]["accuracy"])
    return {name: torch.tensor(values) for name, values in scores.items()}


def train_py_loop(config, backbone, cached, class_count):
    """The head's loop as train.py's Trainer runs it (FeatureTask on float16 features, the
    signed root in the head); returns seconds per epoch and the best valid accuracy."""
    torch.manual_seed(config.seed)
    classifier = ImageClassifier(backbone, build_head(backbone.feature_dim, class_count,
                                                     **head_spec(config)))
    task = FeatureTask(config, classifier, CPU, cached)
    optimizer, scheduler = make_optimizer(config, classifier, task.steps_per_epoch())
    criterion = make_criterion(config, task.train_labels(), class_count, CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    best, started = 0.0, time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        torch.manual_seed(config.seed + epoch)
        task.model.train()
        train_one_epoch(task.model, task.train_batches(epoch), optimizer, scheduler, scaler,
                        criterion, CPU)
        best = max(best, evaluate(task.model, task.eval_batches("valid"), criterion,
                                  CPU)["accuracy"])
    return (time.perf_counter() - started) / config.epochs, best


def studio_loop(config, backbone, cached, class_count):
    """A studio run's seconds per epoch (a warm one from a new head: the same work)."""
    started = time.perf_counter()
    _, valid = fit_head(config, backbone, class_count, cached, CPU)
    return (time.perf_counter() - started) / config.epochs, valid["accuracy"]


def click_to_accuracy(args, backbone, by_split, dataset, tmp, schedule):
    """Seconds from QuickTrainer.start() (what POST /api/retrain calls) to its accuracy, with
    50 photos dropped and 50 relabelled in corrections.json, after the first run (the folder
    as filed, which the studio trains when it opens)."""
    options = StudioOptions(args.data_dir, save_dir=str(tmp), cache_dir=None)
    studio = Studio(options, dataset, by_split, report={}, backbone=backbone)
    Path(studio.corrections_path).unlink(missing_ok=True)
    trainer = QuickTrainer(studio, CPU, schedule)
    first = trainer.wait(trainer.start_first()["id"])
    paths = dataset.splits["train"].paths
    record_decisions(studio.corrections_path, {**{path: None for path in paths[:50]},
                                               **{path: "1" for path in paths[50:100]}})
    started = time.perf_counter()
    run = trainer.wait(trainer.start()["id"])
    assert run["status"] == "done", run
    return time.perf_counter() - started, first, run


def timing(args, backbone, by_split, dataset, cached, class_count):
    """Seconds per epoch of train.py's loop and of a warm retrain's, and click to accuracy."""
    for name, loop in (("train.py --train_stages 0, train.py's loop", train_py_loop),
                       ("the studio's full retrain", studio_loop),
                       ("the studio's warm retrain", studio_loop)):
        schedule = "warm" if "warm" in name else "full"
        config = quick_config(args.data_dir, **RETRAIN_SCHEDULES[schedule])
        runs = [loop(config, backbone, cached, class_count) for _ in range(args.repeats)]
        per_epoch = min(seconds for seconds, _ in runs)
        print(f"{name}: batch {config.batch_size}, {config.epochs} epochs, {per_epoch:.3f} s per "
              f"epoch (best of {args.repeats}), {per_epoch * config.epochs:.1f} s", flush=True)
    for schedule in RETRAIN_SCHEDULES:
        for _ in range(args.repeats):
            seconds, first, run = click_to_accuracy(args, backbone, by_split, dataset,
                                                    Path(args.save_dir), schedule)
            print(f"click to accuracy (--retrain {schedule}): {seconds:.2f} s, valid "
                  f"{run['valid_accuracy']:.2%} (as filed {first['valid_accuracy']:.2%}, "
                  f"{first['seconds']} s; {run['changes']})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--cache_dir", default="/tmp/studio_retrain_cache")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, nargs="*", default=[0.0, 0.01, 0.03],
                        help="shares of the training labels made wrong before the first run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save_dir", default="/tmp/studio_retrain_benchmark")
    parser.add_argument("--skip_timing", action="store_true")
    parser.add_argument("--skip_cv", action="store_true")
    parser.add_argument("--oversample", type=int, default=0,
                        help="the warm retrain sees each fixed photo this many more times")
    args = parser.parse_args()
    by_split, dataset, backbone = features(args)
    torch.set_num_threads(args.threads)
    class_count = len(dataset.class_to_idx)
    labels = {name: torch.tensor(split.labels) for name, split in dataset.splits.items()}
    cached = CachedInputs({"train": (by_split["train"][0][None], labels["train"]),
                           "valid": (by_split["valid"][0], labels["valid"])})
    print(f"train {len(labels['train'])}, valid {len(labels['valid'])} features; "
          f"{args.threads} thread(s)", flush=True)
    if not args.skip_timing:
        timing(args, backbone, by_split, dataset, cached, class_count)
    for share in () if args.skip_cv else args.noise:
        scores = cross_validate(args, backbone, by_split, dataset, share)
        gap = scores["warm retrain"] - scores["from scratch"]
        print(f"cross-validated ({args.folds} folds, seed {args.seed}), {share:.0%} of the "
              "labels wrong then fixed: " + ", ".join(
                  f"{name} {values.mean():.2%} +- {values.std():.2%}"
                  for name, values in scores.items())
              + f"; warm - scratch {100 * gap.mean():+.2f} +- {100 * gap.std():.2f} points "
              f"(per fold {[round(100 * g, 2) for g in gap.tolist()]})", flush=True)


if __name__ == "__main__":
    main()
