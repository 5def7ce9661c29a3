"""The studio's quick retrain on the shared flowers: seconds per epoch of the head's loop as
train.py runs it and as the studio runs it, and the time from the click to the new valid
accuracy (QuickTrainer in-process, 100 decisions applied).

    python benchmarks/quality.py ../shared/data/flowers102 --cache_dir /tmp/q33/cache   # features
    python benchmarks/studio_retrain.py ../shared/data/flowers102 --cache_dir /tmp/q33/cache

Features: benchmarks/quality.py's cache (train/: the image's features; valid/: averaged with
the mirror image's, as train.py's --mirror predict). Cross-validated accuracy of the schedules:
benchmarks/quality.py --settings (README.md).
"""
import argparse
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import quality  # noqa: E402
from flower_classifier.data.corrections import record_decisions  # noqa: E402
from flower_classifier.data.folders import find_splits  # noqa: E402
from flower_classifier.data.split import Dataset  # noqa: E402
from flower_classifier.models.backbones import build_backbone  # noqa: E402
from flower_classifier.models.classifier import ImageClassifier, build_head  # noqa: E402
from flower_classifier.studio.retrain import QUICK, QuickTrainer, fit_head, quick_config  # noqa
from flower_classifier.studio.state import Studio, StudioOptions  # noqa: E402
from flower_classifier.training.loop import evaluate, head_spec, train_one_epoch  # noqa: E402
from flower_classifier.training.optim import make_criterion, make_optimizer  # noqa: E402
from flower_classifier.training.tasks.cached import CachedInputs, FeatureTask  # noqa: E402

CPU = torch.device("cpu")


def features(args):
    """{split: (float16 features, ok)} as train.py has them, from quality.py's cache."""
    data = quality.load_features(argparse.Namespace(cache_dir=args.cache_dir,
                                                    data_dir=args.data_dir, not_flowers=None,
                                                    workers=1))
    out = {"train": data["train"]["plain"]}
    for name in ("valid", "test"):
        out[name] = ((data[name]["plain"].float() + data[name]["mirror"].float()) / 2).half()
    return {name: (rows, torch.ones(len(rows), dtype=torch.bool)) for name, rows in out.items()}, data


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


def click_to_accuracy(args, backbone, by_split, tmp):
    """Seconds from QuickTrainer.start() (what POST /api/retrain calls) to its accuracy, with
    50 photos dropped and 50 relabelled in corrections.json."""
    class_to_idx, splits = find_splits(args.data_dir)
    assert all(len(splits[name].paths) == len(by_split[name][0]) for name in splits), \
        "quality.py's cache left unreadable images out: the rows do not match the files"
    options = StudioOptions(args.data_dir, save_dir=str(tmp), cache_dir=None)
    studio = Studio(options, Dataset(class_to_idx, splits), by_split, report={},
                    backbone=backbone)
    paths = splits["train"].paths
    record_decisions(studio.corrections_path, {**{path: None for path in paths[:50]},
                                               **{path: "1" for path in paths[50:100]}})
    trainer = QuickTrainer(studio, CPU)
    started = time.perf_counter()
    trainer.start()
    while trainer.runs[-1]["status"] == "running":
        time.sleep(0.01)
    run = trainer.runs[-1]
    assert run["status"] == "done", run
    return time.perf_counter() - started, run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--cache_dir", default="/tmp/quality_cache")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save_dir", default="/tmp/studio_retrain_benchmark")
    args = parser.parse_args()
    torch.set_num_threads(1)
    by_split, data = features(args)
    class_count = data["class_count"]
    backbone = build_backbone("efficientnet_lite0")
    cached = CachedInputs({"train": (by_split["train"][0][None],
                                     torch.tensor(data["train"]["labels"])),
                           "valid": (by_split["valid"][0], torch.tensor(data["valid"]["labels"]))})
    default = quick_config(args.data_dir, epochs=None, batch_size=None, learning_rate=None)
    quick = quick_config(args.data_dir)
    print(f"train {len(cached.data['train'][1])}, valid {len(cached.data['valid'][1])} "
          f"features; one thread")
    for name, config, loop in [("train.py --train_stages 0, train.py's loop", default,
                                train_py_loop),
                               ("train.py --train_stages 0, the studio's loop", default,
                                studio_loop),
                               (f"quick {QUICK}, train.py's loop", quick, train_py_loop),
                               (f"quick {QUICK}, the studio's loop", quick, studio_loop)]:
        runs = [loop(config, backbone, cached, class_count) for _ in range(args.repeats)]
        per_epoch = min(seconds for seconds, _ in runs)
        print(f"{name}: {config.epochs} epochs, {per_epoch:.3f} s per epoch (best of "
              f"{args.repeats}), {per_epoch * config.epochs:.1f} s, best valid "
              f"{runs[0][1]:.2%}", flush=True)
    for _ in range(args.repeats):
        seconds, run = click_to_accuracy(args, backbone, by_split, Path(args.save_dir))
        print(f"click to accuracy: {seconds:.2f} s, valid {run['valid_accuracy']:.2%} "
              f"({run['changes']})", flush=True)


if __name__ == "__main__":
    main()
