"""Choose the class-weight default by cross-validation on unbalanced flowers.

    python benchmarks/class_weights.py ../shared/data/flowers102
    python benchmarks/class_weights.py ../shared/data/flowers102 --modes none balanced --folds 3

Protocol. The features of train/ and valid/ come from train.py's feature cache (the calls
train.py makes: datacheck.split_features), are pooled, and made unbalanced: each class keeps a
random share of its images, uniform in [--keep_min, 1] (fixed --seed). The unbalanced set is split
into --folds stratified folds; each weighting (datacheck.class_weights: none, sqrt, balanced)
trains the head on k-1 folds and is scored on the held-out fold by accuracy and by mean per-class
accuracy (each class's recall, averaged: what an unbalanced set's accuracy hides). Means and
standard errors over the folds are printed, and the paired difference of each weighting against
none. test/ is never read.

Head training: train.py is a script (importing it runs its imports and flags), so this is a
minimal loop with train.py's head and optimiser settings for a pretrained backbone
(PRETRAINED_DEFAULTS below, as train.py's): SignedSqrt -> Linear(512) -> ReLU -> Dropout(0.5) ->
Linear, AdamW (lr 1e-3, weight decay 0.05), one warm-up epoch then cosine decay per step, label
smoothing 0.1, batches of 64, 50 epochs, the last epoch scored; the loss gets the class weights.
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
from torch import nn  # noqa: E402

from backbones import DEFAULT_ARCH, build_backbone  # noqa: E402
from cli_utils import HelpFormatter, positive_int, run_cli  # noqa: E402
from data_utils import default_workers, eval_transform, find_splits  # noqa: E402
from datacheck import CLASS_WEIGHT_POWERS, class_weights, split_features  # noqa: E402
from features import FeatureExtractor, default_cache_dir  # noqa: E402
from model_utils import build_head  # noqa: E402

# train.py's PRETRAINED_DEFAULTS (the head's settings; train.py cannot be imported as a library)
PRETRAINED_DEFAULTS = {"epochs": 50, "learning_rate": 0.001, "hidden_units": 512,
                       "dropout": 0.5, "weight_decay": 0.05, "batch_size": 64,
                       "warmup_epochs": 1, "label_smoothing": 0.1, "feature_transform": "sqrt"}


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
    parser.add_argument("--epochs", type=positive_int, default=PRETRAINED_DEFAULTS["epochs"])
    parser.add_argument("--cache_dir", default=str(default_cache_dir()))
    parser.add_argument("--workers", type=int, default=default_workers())
    return parser


def pooled_features(data_dir, cache_dir, workers):
    """(features [N, D], labels [N]) of train/ and valid/, readable images only."""
    class_to_idx, splits = find_splits(data_dir)
    splits.pop("test", None)  # never read: the defaults are chosen without it
    backbone = build_backbone(DEFAULT_ARCH)
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


def stratified_folds(labels, folds, generator):
    """A fold per image, each class dealt round-robin over the folds in random order."""
    fold = torch.empty(len(labels), dtype=torch.long)
    for label in labels.unique().tolist():
        members = (labels == label).nonzero()[:, 0]
        order = members[torch.randperm(len(members), generator=generator)]
        start = torch.randint(folds, (1,), generator=generator).item()
        fold[order] = (torch.arange(len(order)) + start) % folds
    return fold


def train_head(inputs, labels, class_count, weights, epochs, seed):
    """train.py's head on features: AdamW, warm-up then cosine decay, weighted smoothed loss."""
    settings = PRETRAINED_DEFAULTS
    torch.manual_seed(seed)
    head = build_head(inputs.shape[1], class_count, settings["hidden_units"],
                      settings["dropout"], settings["feature_transform"])
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings["learning_rate"],
                                  weight_decay=settings["weight_decay"])
    steps_per_epoch = math.ceil(len(labels) / settings["batch_size"])
    total = epochs * steps_per_epoch
    warmup = min(settings["warmup_epochs"] * steps_per_epoch, total - 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (
        (step + 1) / (warmup + 1) if step < warmup
        else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))))
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=settings["label_smoothing"])
    head.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(settings["batch_size"]):
            loss = criterion(head(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head.eval()


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
    fold = stratified_folds(labels, args.folds, generator)
    results = {mode: [] for mode in args.modes}
    for number in range(args.folds):
        held = fold == number
        for mode in args.modes:
            weights = class_weights(labels[~held], class_count, mode)
            head = train_head(inputs[~held], labels[~held], class_count, weights, args.epochs,
                              args.seed + number)
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
