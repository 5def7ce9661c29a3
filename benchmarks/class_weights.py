"""Choose the class-weight default by cross-validation on unbalanced flowers.

    python benchmarks/class_weights.py ../shared/data/flowers102
    python benchmarks/class_weights.py ../shared/data/flowers102 --modes none balanced --folds 3

Protocol. The features of train/ and valid/ come from train.py's feature cache (the calls
train.py makes: datacheck.split_features), are pooled, and made unbalanced: each class keeps a
random share of its images, uniform in [--keep_min, 1] (fixed --seed). The unbalanced set is split
into --folds stratified folds; each weighting (trainer.class_weights: none, sqrt, balanced)
trains the head on k-1 folds and is scored on the held-out fold by accuracy and by mean per-class
accuracy (each class's recall, averaged: what an unbalanced set's accuracy hides). Means and
standard errors over the folds are printed, and the paired difference of each weighting against
none. test/ is never read.

Head training: train.py's own, with its defaults for a pretrained backbone (TrainConfig;
trainer.make_optimizer, make_criterion and train_one_epoch through quality.py's train_heads) and
--class_weights set to each weighting; the last epoch is scored.
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402

from flower_classifier.cli.options import HelpFormatter, positive_int
from flower_classifier.cli.runner import run_cli
from flower_classifier.data.folders import find_splits
from flower_classifier.data.loading import default_workers
from flower_classifier.data.transforms import eval_transform
from flower_classifier.models.features import FeatureExtractor, default_cache_dir, split_features
from flower_classifier.training.config import family_default
from flower_classifier.training.optim import CLASS_WEIGHT_POWERS
from quality import feature_backbone, stratified_folds, train_heads  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("data_dir", help="the flowers, with train/ and valid/")
    parser.add_argument("--modes", nargs="+", default=list(CLASS_WEIGHT_POWERS),
                        choices=list(CLASS_WEIGHT_POWERS), help="weightings to compare")
    parser.add_argument("--folds", type=positive_int, default=5)
    parser.add_argument("--keep_min", type=float, default=0.1,
                        help="the smallest share of a class's images kept")
    parser.add_argument("--seed", type=int, default=0, help="what is kept, folds, head init")
    parser.add_argument("--epochs", type=positive_int, default=family_default("epochs"))
    parser.add_argument("--cache_dir", default=str(default_cache_dir()))
    parser.add_argument("--workers", type=int, default=default_workers())
    return parser


def pooled_features(data_dir, cache_dir, workers):
    """(features [N, D], labels [N]) of train/ and valid/, readable images only."""
    class_to_idx, splits = find_splits(data_dir)
    splits.pop("test", None)  # never read: the defaults are chosen without it
    backbone = feature_backbone()
    extractor = FeatureExtractor(backbone, torch.device("cpu"), cache_dir=cache_dir,
                                 workers=workers, images=sum(len(s.paths) for s in splits.values()))
    features = split_features(extractor, splits, eval_transform(backbone.preprocess))
    inputs = torch.cat([features[name][0][features[name][1]] for name in splits]).float()
    labels = torch.cat([torch.tensor(splits[name].labels)[features[name][1]] for name in splits])
    return inputs, labels, len(class_to_idx)


def unbalanced(labels, keep_min, generator):
    """Indices keeping a random share in [keep_min, 1] of each class's images."""
    kept = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero()[:, 0]
        share = keep_min + (1 - keep_min) * torch.rand(1, generator=generator).item()
        count = max(2, round(share * len(members)))
        kept.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(kept)


def scores(head, inputs, labels, class_count):
    """(accuracy, mean per-class accuracy) of the head on these images."""
    with torch.no_grad():
        right = head(inputs).argmax(1) == labels
    recalls = [right[labels == label].float().mean().item()
               for label in range(class_count) if (labels == label).any()]
    return right.float().mean().item(), statistics.mean(recalls)


def standard_error(values):
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def main(args):
    torch.set_num_threads(1)  # as train.py's head training on the CPU
    started = time.perf_counter()
    inputs, labels, class_count = pooled_features(args.data_dir, args.cache_dir, args.workers)
    generator = torch.Generator().manual_seed(args.seed)
    kept = unbalanced(labels, args.keep_min, generator)
    inputs, labels = inputs[kept], labels[kept]
    counts = torch.bincount(labels, minlength=class_count)
    print(f"unbalanced set: {len(labels)} images, {counts.min()} to {counts.max()} per class "
          f"(ratio {counts.max() / counts.min():.1f}); {args.folds} folds, {args.epochs} epochs "
          f"({time.perf_counter() - started:.0f} s to load)")
    fold = stratified_folds(labels, args.folds, args.seed)
    results = {mode: [] for mode in args.modes}
    for number in range(args.folds):
        held = fold == number
        for mode in args.modes:
            head, = train_heads({"class_weights": mode, "epochs": args.epochs}, inputs[~held],
                                labels[~held], class_count, args.seed + number)
            results[mode].append(scores(head, inputs[held], labels[held], class_count))
        print(f"fold {number + 1}/{args.folds}: " + "; ".join(
            f"{mode} {100 * results[mode][-1][0]:.2f}% / {100 * results[mode][-1][1]:.2f}%"
            for mode in args.modes) + f" ({time.perf_counter() - started:.0f} s)")
    print("weighting: accuracy, mean per-class accuracy (mean +- standard error over folds); "
          "paired difference with none")
    for mode in args.modes:
        accuracy = [row[0] for row in results[mode]]
        per_class = [row[1] for row in results[mode]]
        line = (f"  {mode:9s} {100 * statistics.mean(accuracy):.2f} +- "
                f"{100 * standard_error(accuracy):.2f}%   {100 * statistics.mean(per_class):.2f} "
                f"+- {100 * standard_error(per_class):.2f}%")
        if mode != "none" and "none" in results:
            gains = [row[1] - base[1] for row, base in zip(results[mode], results["none"])]
            line += (f"   per-class gain {100 * statistics.mean(gains):+.2f} +- "
                     f"{100 * standard_error(gains):.2f} points")
        print(line)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
