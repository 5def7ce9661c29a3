"""The studio's quick retrain on the shared flowers: seconds per epoch of the head's loop as
train.py runs it and as the studio runs it, and the time from the click to the new valid
accuracy (QuickTrainer in-process, 100 decisions applied).

    python benchmarks/studio_retrain.py ../shared/data/flowers102

Features as train.py computes them (its FeatureExtractor, engine and cache: train/ the image's
features, valid/ and test/ averaged with the mirror image's). Then the schedules are
cross-validated as benchmarks/quality.py does (train/ + valid/ pooled, stratified folds, the
last epoch scored on the held-out fold), on these features: valid/'s rows mirror-averaged,
train/'s not (quality.py averages both for its held-out folds, so its figures differ a little;
the comparison between schedules is on the same folds and features).
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
from flower_classifier.models.classifier import ImageClassifier, build_head  # noqa: E402
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


def cross_validate(config, backbone, by_split, dataset, folds, seed):
    """Accuracy (mean, standard deviation over folds) of config's head, the last epoch scored on
    each held-out fold of train/ + valid/ pooled (train/'s plain features, valid/'s
    mirror-averaged ones, as train.py has them), as benchmarks/quality.py does."""
    inputs = torch.cat([by_split[name][0] for name in ("train", "valid")])
    labels = torch.tensor([*dataset.splits["train"].labels, *dataset.splits["valid"].labels])
    fold_of = quality.stratified_folds(labels, folds, seed)
    scores = []
    for fold in range(folds):
        held = fold_of == fold
        cached = CachedInputs({"train": (inputs[~held][None], labels[~held]),
                               "valid": (inputs[held], labels[held])})
        _, valid = fit_head(config, backbone, len(dataset.class_to_idx), cached, CPU,
                            keep_best=False)
        scores.append(valid["accuracy"])
    scores = torch.tensor(scores)
    return scores.mean().item(), scores.std().item(), scores.tolist()


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
    started = time.perf_counter()
    _, valid = fit_head(config, backbone, class_count, cached, CPU)
    return (time.perf_counter() - started) / config.epochs, valid["accuracy"]


def click_to_accuracy(args, backbone, by_split, dataset, tmp, schedule):
    """Seconds from QuickTrainer.start() (what POST /api/retrain calls) to its accuracy, with
    50 photos dropped and 50 relabelled in corrections.json."""
    options = StudioOptions(args.data_dir, save_dir=str(tmp), cache_dir=None)
    studio = Studio(options, dataset, by_split, report={}, backbone=backbone)
    paths = dataset.splits["train"].paths
    record_decisions(studio.corrections_path, {**{path: None for path in paths[:50]},
                                               **{path: "1" for path in paths[50:100]}})
    trainer = QuickTrainer(studio, CPU, **RETRAIN_SCHEDULES[schedule])
    started = time.perf_counter()
    trainer.start()
    while trainer.runs[-1]["status"] == "running":
        time.sleep(0.01)
    run = trainer.runs[-1]
    assert run["status"] == "done", run
    return time.perf_counter() - started, run


SCHEDULES = {"train.py --train_stages 0": {},
             "batch 512, lr 0.008, 20 epochs (--retrain fast)": {
                 "epochs": 20, "batch_size": 512, "learning_rate": 0.008},
             "batch 512, lr 0.006, 15 epochs": {"epochs": 15, "batch_size": 512,
                                                "learning_rate": 0.006},
             "batch 256, lr 0.004, 30 epochs": {"epochs": 30, "batch_size": 256,
                                                "learning_rate": 0.004},
             "batch 256, lr 0.004, 24 epochs": {"epochs": 24, "batch_size": 256,
                                                "learning_rate": 0.004},
             "batch 128, lr 0.003, 24 epochs": {"epochs": 24, "batch_size": 128,
                                                "learning_rate": 0.003}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--cache_dir", default="/tmp/studio_retrain_cache")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_dir", default="/tmp/studio_retrain_benchmark")
    parser.add_argument("--schedules", nargs="*", default=list(SCHEDULES), choices=SCHEDULES,
                        metavar="NAME", help=f"schedules to cross-validate: {list(SCHEDULES)}")
    parser.add_argument("--skip_timing", action="store_true")
    args = parser.parse_args()
    by_split, dataset, backbone = features(args)
    torch.set_num_threads(1)
    class_count = len(dataset.class_to_idx)
    labels = {name: torch.tensor(split.labels) for name, split in dataset.splits.items()}
    cached = CachedInputs({"train": (by_split["train"][0][None], labels["train"]),
                           "valid": (by_split["valid"][0], labels["valid"])})
    print(f"train {len(labels['train'])}, valid {len(labels['valid'])} features; one thread",
          flush=True)
    configs = {name: quick_config(args.data_dir, **overrides)
               for name, overrides in SCHEDULES.items()}
    timed = ("train.py --train_stages 0", "batch 512, lr 0.008, 20 epochs (--retrain fast)")
    for name in timed if not args.skip_timing else ():
        for loop_name, loop in (("train.py's loop", train_py_loop),
                                ("the studio's loop", studio_loop)):
            runs = [loop(configs[name], backbone, cached, class_count)
                    for _ in range(args.repeats)]
            per_epoch = min(seconds for seconds, _ in runs)
            print(f"{name}, {loop_name}: {configs[name].epochs} epochs, {per_epoch:.3f} s per "
                  f"epoch (best of {args.repeats}), {per_epoch * configs[name].epochs:.1f} s, "
                  f"valid {runs[0][1]:.2%}", flush=True)
    for schedule in RETRAIN_SCHEDULES if not args.skip_timing else ():
        for _ in range(args.repeats):
            seconds, run = click_to_accuracy(args, backbone, by_split, dataset,
                                             Path(args.save_dir), schedule)
            print(f"click to accuracy (--retrain {schedule}): {seconds:.2f} s, valid "
                  f"{run['valid_accuracy']:.2%} ({run['changes']})", flush=True)
    for name in args.schedules:
        config = configs[name]
        mean, std, scores = cross_validate(config, backbone, by_split, dataset, args.folds,
                                           args.seed)
        print(f"cross-validated ({args.folds} folds, seed {args.seed}) {name} "
              f"(batch {config.batch_size}, lr {config.learning_rate}, {config.epochs} epochs): "
              f"{mean:.2%} +- {std:.2%} {[round(s, 4) for s in scores]}", flush=True)


if __name__ == "__main__":
    main()
