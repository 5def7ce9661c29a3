"""Is a small training set trained enough? train.py on a few photos per class of the flowers,
scored on valid/, for several --min_epoch_steps.

    python benchmarks/small_sets.py ../shared/data/flowers102 --per_class 3 5 10 15 \
        --min_epoch_steps 0 25 40 50
    python benchmarks/small_sets.py ../shared/data/flowers102 --train_stages 2 --per_class 5

Each seed draws --per_class photos of each class of train/ at random (active_learning.py's
first_labels; the same photos for every --min_epoch_steps), trains as train.py trains (its
defaults but --min_epoch_steps, through quality.py: the head alone on the cached features, or
with --train_stages the backbone's last stages on the cached activations that enter them), and
scores the last epoch on valid/ (mirror-averaged, as predict.py scores). --classes keeps the
first N classes only. Printed: the mean valid accuracy (and each seed's) per setting.
"""
import argparse
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402

import quality  # noqa: E402
from active_learning import first_labels, load_features  # noqa: E402
from flower_classifier.data.folders import find_splits  # noqa: E402
from flower_classifier.data.transforms import eval_transform  # noqa: E402
from flower_classifier.models.features import FeatureExtractor  # noqa: E402
from flower_classifier.models.stages import split_backbone  # noqa: E402


def drawn(labels, per_class, seed, classes):
    """The seed's per_class random photos of each of the first classes (indices of labels)."""
    return [index for index in first_labels(labels, per_class,
                                            torch.Generator().manual_seed(seed))
            if labels[index] < classes]


def head_alone_scorer(args):
    """score(setting, seed, per_class) of the head alone on the cached features."""
    features, labels, valid_features, valid_labels, _ = load_features(args.data_dir,
                                                                      args.cache_dir)
    valid = valid_labels < args.classes

    def score(setting, seed, per_class):
        chosen = drawn(labels, per_class, seed, args.classes)
        heads = quality.train_heads(setting, features[chosen].half(), labels[chosen],
                                    args.classes, seed)
        predicted = quality.mean_logits(heads, valid_features[valid]).argmax(1)
        return (predicted == valid_labels[valid]).float().mean().item()
    return score


def stages_scorer(args):
    """score(setting, seed, per_class) of --train_stages on the cached activations."""
    _, splits = find_splits(args.data_dir)
    backbone = quality.feature_backbone()
    bottom, _ = split_backbone(backbone, args.train_stages)
    extractor = FeatureExtractor(backbone, quality.CPU, cache_dir=args.cache_dir, bottom=bottom,
                                 trained_stages=args.train_stages,
                                 images=sum(len(split.paths) for split in splits.values()))

    def activations(split, indices):
        rows, ok = extractor.features(split.root, [split.paths[i] for i in indices],
                                      eval_transform(backbone.preprocess),
                                      description=split.root.name, mirror=True)
        labels = torch.tensor([split.labels[i] for i in indices], dtype=torch.long)
        return {"activations": rows[ok], "labels": labels[ok]}

    valid_split = splits["valid"]
    valid = activations(valid_split, [index for index, label in enumerate(valid_split.labels)
                                      if label < args.classes])
    labels = torch.tensor(splits["train"].labels)

    def score(setting, seed, per_class):
        chosen = drawn(labels, per_class, seed, args.classes)
        data = {"train": activations(splits["train"], chosen), "valid": valid}
        task = quality.train_stage_task(setting, data, args.train_stages, args.classes, seed)
        predicted = quality.task_logits(task, "valid").argmax(1)
        return (predicted == valid["labels"]).float().mean().item()
    return score


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", help="flowers folder with train/ and valid/")
    parser.add_argument("--per_class", type=int, nargs="+", default=[3, 5, 10, 15],
                        help="training photos per class (default: 3 5 10 15)")
    parser.add_argument("--min_epoch_steps", type=int, nargs="+", default=[0, 40],
                        help="train.py's --min_epoch_steps to compare (default: 0 40)")
    parser.add_argument("--train_stages", type=int, default=0,
                        help="0 (default): the head alone; N: the backbone's last N stages too")
    parser.add_argument("--classes", type=int, default=102, help="the first N classes only")
    parser.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 (default 4)")
    parser.add_argument("--cache_dir", default="/tmp/active_learning_cache",
                        help="train.py's feature (or activation) cache")
    return parser


def main(args):
    started = time.perf_counter()
    score = (stages_scorer if args.train_stages else head_alone_scorer)(args)
    print("| photos per class | --min_epoch_steps | valid accuracy, mean | per seed |")
    print("|---|---|---|---|")
    for per_class in args.per_class:
        for steps in args.min_epoch_steps:
            setting = {"min_epoch_steps": steps}
            if args.train_stages:
                setting["train_stages"] = args.train_stages
            scores = [100 * score(setting, seed, per_class) for seed in range(args.seeds)]
            print(f"| {per_class} | {steps} | {sum(scores) / len(scores):.2f} | "
                  + ", ".join(f"{value:.2f}" for value in scores)
                  + f" | ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
