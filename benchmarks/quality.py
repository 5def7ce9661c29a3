"""Choose train.py's defaults by cross-validation, and check the unknown verdict and calibration.

    python benchmarks/quality.py ../shared/data/flowers102 --not_flowers ../shared/data/not_flowers
    python benchmarks/quality.py ../shared/data/flowers102 --settings today regularised --folds 3

Protocol. The features of train/, valid/, test/ and --not_flowers are extracted once (each image
decoded once; the image and its mirror image go through the backbone in the same batch) and kept
in --cache_dir. train/ and valid/ are pooled and split into --folds stratified folds (fixed
seed); each setting trains train.py's head with train.py's own functions (make_optimizer,
train_one_epoch, its loss and schedule) on k-1 folds and is scored on the last epoch on the
held-out fold. The chosen setting is the one with the best mean accuracy; the cheapest (in
backbone passes, then head training) within one standard error of it (the one-standard-error
rule) is printed beside it, for the trade of accuracy against time. Only then is the chosen
setting trained on train/ (last epoch) and checked once on test/; the test split never chooses
anything.

Trained stages (--train_stages N, issue 22): the activations that enter the backbone's last N
stages are extracted once (train.py's FeatureExtractor and cache; the image and its mirror
image) and the same folds score the frozen head (on the pretrained stages' features of those
activations) against STAGE_SETTINGS, which train the stages with the head as train.py does
(StageTask, its optimiser and schedule); the chosen one is checked once on test/ and
--not_flowers, its unknown verdict computed from the trained stages' features as train.py does.

Unknown verdict: class means of the training features; an image is unknown when the cosine
similarity of its feature to the nearest class mean is below a threshold that lets --pass_rate
of the valid images through. The pass rate is checked by cross-validation (flowers of held-out
folds flagged), then the rule is checked once on test/ and on --not_flowers.
"""
import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from functools import cache
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from flower_classifier.data.folders import find_splits, list_images
from flower_classifier.data.loading import ImageFiles, default_workers, image_loader
from flower_classifier.data.transforms import eval_transform
from flower_classifier.models.backbones import DEFAULT_ARCH, build_backbone
from flower_classifier.models.calibration import (
    class_means,
    expected_calibration_error,
    fit_temperature,
    nearest_similarity,
    pass_threshold,
)
from flower_classifier.models.classifier import ImageClassifier, build_head
from flower_classifier.models.features import FeatureExtractor, mirrored
from flower_classifier.models.stages import split_backbone
from flower_classifier.training import loop, optim
from flower_classifier.training.config import TrainConfig, family_default
from flower_classifier.training.tasks import base
from flower_classifier.training.tasks.cached import CachedInputs, FeatureTask, StageTask
from flower_classifier.utils.files import atomic_write

CPU = torch.device("cpu")
CACHE_NAME = "quality_features"

# Each setting: train.py flags (as a dict; mirror as train.py --mirror) plus what the benchmark
# tries around train.py: heads: that many heads (seeds) averaged; standardise: features z-scored
# with the training mean and std; mixup: mixup of feature pairs with that alpha. Settings that
# leave out a flag take train.py's default for it.
TODAY = {"dropout": 0.2, "label_smoothing": 0.0, "weight_decay": 1e-4, "epochs": 20,
         "mirror": "off", "feature_transform": "none", "batch_size": 64, "learning_rate": 0.001}
REGULARISED = {"dropout": 0.5, "label_smoothing": 0.1, "weight_decay": 0.05, "epochs": 30,
               "learning_rate": 0.001, "feature_transform": "none", "batch_size": 64}
SQRT = {**REGULARISED, "feature_transform": "sqrt", "mirror": "predict"}
SETTINGS = {
    "today": {**TODAY},
    "regularised": {**REGULARISED, "mirror": "off"},
    "regularised+mirror": {**REGULARISED, "mirror": "all"},
    "regularised, mirror to predict": {**REGULARISED, "mirror": "predict"},
    "mirror all, 50 epochs": {**REGULARISED, "mirror": "all", "epochs": 50},
    "mirror all, dropout 0.6, wd 0.1": {**REGULARISED, "mirror": "all", "dropout": 0.6,
                                        "weight_decay": 0.1},
    "mirror all, standardised": {**REGULARISED, "mirror": "all", "standardise": True},
    "mirror all, mixup 0.4": {**REGULARISED, "mirror": "all", "mixup": 0.4},
    "mirror all, 3 heads": {**REGULARISED, "mirror": "all", "heads": 3},
    "sqrt": {**SQRT},
    "sqrt, 40 epochs": {**SQRT, "epochs": 40},
    "sqrt, 50 epochs": {**SQRT, "epochs": 50},
    "sqrt, lr 0.002": {**SQRT, "learning_rate": 0.002},
    "sqrt, lr 0.002, 40 epochs": {**SQRT, "learning_rate": 0.002, "epochs": 40},
    "sqrt, lr 0.002, 35 epochs": {**SQRT, "learning_rate": 0.002, "epochs": 35},
    "sqrt, lr 0.003, 30 epochs": {**SQRT, "learning_rate": 0.003, "epochs": 30},
    "sqrt, hidden 256": {**SQRT, "hidden_units": 256},
    "sqrt, mirror all": {**SQRT, "mirror": "all"},
    "sqrt, batch 128, lr 0.0015, 50 epochs": {**SQRT, "batch_size": 128,
                                              "learning_rate": 0.0015, "epochs": 50},
    "sqrt, batch 128, lr 0.002, 50 epochs": {**SQRT, "batch_size": 128,
                                             "learning_rate": 0.002, "epochs": 50},
    "sqrt, batch 128, lr 0.002, 40 epochs": {**SQRT, "batch_size": 128,
                                             "learning_rate": 0.002, "epochs": 40},
    "sqrt, batch 128, lr 0.003, 40 epochs": {**SQRT, "batch_size": 128,
                                             "learning_rate": 0.003, "epochs": 40},
    "sqrt, batch 256, lr 0.002, 50 epochs": {**SQRT, "batch_size": 256, "learning_rate": 0.002,
                                             "epochs": 50},
    "sqrt, batch 256, lr 0.003, 50 epochs": {**SQRT, "batch_size": 256, "learning_rate": 0.003,
                                             "epochs": 50},
    "sqrt, batch 256, lr 0.002, 30 epochs": {**SQRT, "batch_size": 256, "learning_rate": 0.002},
    "sqrt, batch 256, lr 0.003, 30 epochs": {**SQRT, "batch_size": 256, "learning_rate": 0.003},
    "sqrt, batch 256, lr 0.004, 30 epochs": {**SQRT, "batch_size": 256, "learning_rate": 0.004},
    "sqrt, batch 256, lr 0.003, 20 epochs": {**SQRT, "batch_size": 256, "learning_rate": 0.003,
                                             "epochs": 20},
    "sqrt, batch 256, lr 0.004, 20 epochs": {**SQRT, "batch_size": 256, "learning_rate": 0.004,
                                             "epochs": 20},
    # What the 8 s warm-run goal of issue 12 leaves on a 2-core CPU: about 1.5 s of head training.
    "sqrt, batch 256, lr 0.004, 8 epochs": {**SQRT, "batch_size": 256, "learning_rate": 0.004,
                                            "epochs": 8},
    "sqrt, lr 0.002, 4 epochs": {**SQRT, "learning_rate": 0.002, "epochs": 4},
    # The studio's quick retrain (issue 33): a few seconds from the click to the accuracy.
    "sqrt, batch 512, lr 0.008, 20 epochs": {**SQRT, "batch_size": 512, "learning_rate": 0.008,
                                             "epochs": 20},
    "sqrt, batch 512, lr 0.006, 15 epochs": {**SQRT, "batch_size": 512, "learning_rate": 0.006,
                                             "epochs": 15},
    "sqrt, batch 512, lr 0.008, 12 epochs": {**SQRT, "batch_size": 512, "learning_rate": 0.008,
                                             "epochs": 12},
}
# What runs when --settings is not given: this session's comparison (the others were measured
# in earlier sessions, see README.md): the head alone's default since issue 22's third session
# (batches of 128 at lr 0.002 for 40 epochs) against the earlier one and the other ties.
DEFAULT_SETTINGS = ("sqrt, batch 128, lr 0.002, 40 epochs", "sqrt, 50 epochs",
                    "sqrt, lr 0.002, 40 epochs", "sqrt, lr 0.002, 35 epochs",
                    "sqrt, lr 0.003, 30 epochs", "sqrt, batch 128, lr 0.002, 50 epochs",
                    "sqrt, batch 128, lr 0.003, 40 epochs")
BENCHMARK_KEYS = ("mirror", "heads", "standardise", "mixup")
# --train_stages: the frozen head (trained on the pretrained stages' features of the cached
# activations; train.py --train_stages 0 until issue 22's third session) against training the
# last stages with it. The first stage setting is train.py's default since issue 22 (--mirror
# predict: training activation maps flipped at random; the batch norms folded since its second
# session: "unfolded" is its first session's default); "mirror all" trains on the mirror images'
# own activations instead. The other settings ran unfolded before the folding
# (benchmarks/README.md says which).
STAGE_SETTINGS = {
    "frozen: sqrt, 50 epochs": SETTINGS["sqrt, 50 epochs"],
    "stages, 12 epochs, lr 3e-4": {**SQRT, "epochs": 12, "backbone_lr": 3e-4},
    "stages, mirror all, 12 epochs, lr 3e-4": {**SQRT, "mirror": "all", "epochs": 12,
                                               "backbone_lr": 3e-4},
    "stages, 20 epochs, lr 2e-4": {**SQRT, "epochs": 20, "backbone_lr": 2e-4},
    "stages, 8 epochs, lr 3e-4": {**SQRT, "epochs": 8, "backbone_lr": 3e-4},
    "stages, 8 epochs, lr 4e-4": {**SQRT, "epochs": 8, "backbone_lr": 4e-4},
    "stages, 10 epochs, lr 3e-4": {**SQRT, "epochs": 10, "backbone_lr": 3e-4},
    "stages, unfolded, 12 epochs, lr 3e-4": {**SQRT, "epochs": 12, "backbone_lr": 3e-4,
                                             "fold_norms": False},
}
SETTINGS.update(STAGE_SETTINGS)


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Cross-validate head settings on train+valid; check the unknown verdict.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data_dir", help="folder with train/, valid/ and test/")
    parser.add_argument("--not_flowers", default=None,
                        help="folder of photos of none of the classes (searched recursively)")
    parser.add_argument("--cache_dir", default="/tmp/quality_cache",
                        help="where the extracted features are kept")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and the heads")
    parser.add_argument("--settings", nargs="*", default=list(DEFAULT_SETTINGS),
                        choices=list(SETTINGS),
                        metavar="NAME", help=f"settings to cross-validate: {', '.join(SETTINGS)}")
    parser.add_argument("--pass_rate", type=float, default=0.95,
                        help="share of valid images the unknown threshold lets through")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes decoding images")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures")
    parser.add_argument("--train_stages", type=int, default=0,
                        help="N > 0: cross-validate --stage_settings, which train the backbone's "
                        "last N stages with the head, against the frozen head")
    parser.add_argument("--stage_settings", nargs="*", default=list(STAGE_SETTINGS),
                        choices=list(STAGE_SETTINGS), metavar="NAME",
                        help=f"settings with --train_stages: {', '.join(STAGE_SETTINGS)}")
    parser.add_argument("--classes", type=int, default=0,
                        help="use only the first N classes (0: all), for a cheaper comparison")
    return parser


# --- features --------------------------------------------------------------------------------

@torch.inference_mode()
def plain_and_mirror_features(extractor, paths, preprocess, workers):
    """(features, mirror features, ok) of each image, decoded once: the image and its mirror
    image go through the backbone in one batch."""
    dataset = ImageFiles(paths, eval_transform(preprocess), preprocess.crop)
    plain, mirror, ok = [], [], []
    for images, _, good in image_loader(dataset, 64, workers, CPU):
        both = extractor.engine(torch.cat([images, images.flip(3)])).float().half()
        plain.append(both[:len(images)])
        mirror.append(both[len(images):])
        ok.append(good)
    return torch.cat(plain), torch.cat(mirror), torch.cat(ok)


def cached(cache_dir, prefix, made_by, compute):
    """compute()'s tensors, kept in cache_dir in a file named by prefix and a digest of made_by
    (what makes them): computed once, then read (the benchmarks' feature caches)."""
    path = Path(cache_dir) / f"{prefix}-{hashlib.sha256(made_by.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    data = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: torch.save(data, temporary))
    return data


def load_features(args):
    """{split: {"plain", "mirror", "labels"}} for train, valid, test (and not_flowers), readable
    images only; extracted once, then read from --cache_dir."""
    backbone = feature_backbone()
    # Named by what makes the features: the weights and the exact transform (resize filter too).
    made_by = f"{backbone.name} {backbone.weights} {eval_transform(backbone.preprocess)!r}"
    return cached(args.cache_dir, CACHE_NAME, made_by, lambda: extract_features(args, backbone))


def extract_features(args, backbone):
    """load_features' figures, computed."""
    class_to_idx, splits = find_splits(args.data_dir)
    sources = {name: (split.paths, split.labels) for name, split in splits.items()}
    if args.not_flowers:
        paths = list_images(args.not_flowers)
        sources["not_flowers"] = (paths, [-1] * len(paths))
    extractor = FeatureExtractor(backbone, CPU, workers=args.workers, engine="torch")
    data = {}
    for name, (paths, labels) in sources.items():
        started = time.perf_counter()
        plain, mirror, ok = plain_and_mirror_features(extractor, paths, backbone.preprocess,
                                                      args.workers)
        data[name] = {"plain": plain[ok], "mirror": mirror[ok],
                      "labels": torch.tensor(labels, dtype=torch.long)[ok]}
        print(f"features of {name}: {len(paths)} images, {time.perf_counter() - started:.0f} s",
              flush=True)
    return {**data, "class_count": len(class_to_idx)}


def inputs_of(split, mirror):
    """What the head trains on, as train.py --mirror: mirror-averaged features with "all",
    the features as they are with "predict" and "off"."""
    return mirror_averaged(split) if mirror == "all" else split["plain"]


def mirror_averaged(split):
    return ((split["plain"].float() + split["mirror"].float()) / 2).half()


def eval_inputs(split, mirror):
    """What the head predicts from: mirror-averaged features unless --mirror off."""
    return mirror_averaged(split) if mirror in ("all", "predict") else split["plain"]


# --- training with train.py's own functions -----------------------------------------------------

class MixupTask(FeatureTask):
    """train.py's batches, mixed pairwise (mixup on features) with soft targets."""

    def __init__(self, config, classifier, cached_inputs, alpha, class_count):
        super().__init__(config, classifier, CPU, cached_inputs)
        self.beta = torch.distributions.Beta(alpha, alpha)
        self.class_count = class_count

    def train_batches(self, epoch):
        for inputs, labels in super().train_batches(epoch):
            weight = self.beta.sample((len(labels), 1))
            partner = torch.randperm(len(labels))
            targets = nn.functional.one_hot(labels, self.class_count).float()
            yield (weight * inputs + (1 - weight) * inputs[partner],
                   weight * targets + (1 - weight) * targets[partner])


def mirror_of(setting):
    """The setting's --mirror, train.py's default where it has none."""
    return setting.get("mirror", family_default("mirror"))


def train_config(setting):
    """train.py's defaults with the setting's flags."""
    return TrainConfig("unused", **{key: value for key, value in setting.items()
                                    if key not in BENCHMARK_KEYS}).resolved(from_scratch=False)


@cache
def feature_backbone():
    """The pretrained backbone as train.py's classifier holds it (its features come from the
    cache; train.py's optimiser is chosen by it being pretrained)."""
    return build_backbone(DEFAULT_ARCH)


def train_heads(setting, train_inputs, train_labels, class_count, seed):
    """The setting's head(s), trained as train.py's Trainer trains them (its task, optimiser,
    schedule, loss and seeding; the last epoch), in eval mode; as wide as the inputs."""
    config = train_config(setting)
    if train_inputs.dim() == 2:
        train_inputs = train_inputs.unsqueeze(0)  # train.py's views dimension
    inputs = CachedInputs({"train": (train_inputs, train_labels)})
    backbone = feature_backbone()
    heads = []
    for index in range(setting.get("heads", 1)):
        config = replace(config, seed=seed + index)
        torch.manual_seed(config.seed)
        classifier = ImageClassifier(backbone, build_head(
            train_inputs.shape[-1], class_count, **loop.head_spec(config)))
        task = (MixupTask(config, classifier, inputs, setting["mixup"], class_count)
                if setting.get("mixup") else FeatureTask(config, classifier, CPU, inputs))
        heads.append(run_epochs(config, task, classifier))
    return heads


@torch.no_grad()
def mean_logits(heads, inputs):
    """The heads' logits averaged (one head: its logits)."""
    return torch.stack([head(inputs.float()) for head in heads]).mean(0)


class Standardiser:
    """Features z-scored with the training features' mean and std."""

    def __init__(self, features):
        features = features.float().reshape(-1, features.shape[-1])
        self.mean, self.std = features.mean(0), features.std(0) + 1e-6

    def __call__(self, features):
        return (features.float() - self.mean) / self.std


def fit_and_score(setting, train_split, held_out, class_count, seed):
    """Accuracy on held_out of the setting trained on train_split (last epoch)."""
    inputs = inputs_of(train_split, mirror_of(setting))
    test_inputs = eval_inputs(held_out, mirror_of(setting))
    if setting.get("standardise"):
        standardise = Standardiser(inputs)
        inputs, test_inputs = standardise(inputs), standardise(test_inputs)
    heads = train_heads(setting, inputs, train_split["labels"], class_count, seed)
    predicted = mean_logits(heads, test_inputs).argmax(1)
    return (predicted == held_out["labels"]).float().mean().item()


def stratified_folds(labels, folds, seed):
    """Fold index of each image: each class's images shuffled and dealt round-robin."""
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(labels), dtype=torch.long)
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = int(torch.randint(folds, (1,), generator=generator))
        fold_of[members] = (torch.arange(len(members)) + start) % folds
    return fold_of


def subset(split, mask):
    return {key: value[mask] for key, value in split.items()}


def pooled(data):
    return {key: torch.cat([data["train"][key], data["valid"][key]])
            for key in ("plain", "mirror", "labels")}


def cross_validate(data, names, folds, seed):
    """{setting: (mean, std, seconds)} of held-out accuracy over the folds."""
    pool = pooled(data)
    fold_of = stratified_folds(pool["labels"], folds, seed)
    results = {}
    for name in names:
        started = time.perf_counter()
        scores = [fit_and_score(SETTINGS[name], subset(pool, fold_of != fold),
                                subset(pool, fold_of == fold), data["class_count"], seed)
                  for fold in range(folds)]
        scores = torch.tensor(scores)
        results[name] = (scores.mean().item(), scores.std().item(),
                         (time.perf_counter() - started) / folds)
        print(f"  {name:32s} {100 * results[name][0]:.2f} ± {100 * results[name][1]:.2f} %"
              f"  ({results[name][2]:.0f} s per fold)", flush=True)
    return results, fold_of


def cost(setting, seconds_per_fold):
    """What a cold default run costs, roughly: backbone passes (the mirror doubles those of the
    images it is used on; train/ holds 80% of them), then the head's training as measured (its
    epochs, batch size and width all count)."""
    mirror = mirror_of(setting)
    passes = 0.8 * (2 if mirror == "all" else 1) + 0.2 * (1 if mirror == "off" else 2)
    return passes, seconds_per_fold


def choose(results):
    """The setting with the best CV mean."""
    return max(results, key=lambda name: results[name][0])


def one_standard_error(results, folds):
    """The one-standard-error rule: the cheapest setting whose CV mean is within one standard
    error (std / sqrt(folds)) of the best mean."""
    best_mean, best_std, _ = results[choose(results)]
    tied = [name for name, (mean, _, _) in results.items()
            if mean >= best_mean - best_std / folds ** 0.5]
    return min(tied, key=lambda name: cost(SETTINGS[name], results[name][2]))


# --- unknown verdict and calibration ---------------------------------------------------------

def cv_flag_rate(data, fold_of, folds, mirror, pass_rates, seed):
    """Per pass rate, the share of unseen flowers flagged unknown when means come from k-1 folds
    and the threshold from half of the held-out fold, flagged counted on its other half."""
    pool = pooled(data)
    generator = torch.Generator().manual_seed(seed)
    flagged = {rate: [] for rate in pass_rates}
    for fold in range(folds):
        training, held_out = subset(pool, fold_of != fold), subset(pool, fold_of == fold)
        means = class_means(inputs_of(training, mirror), training["labels"], data["class_count"])
        scores = nearest_similarity(eval_inputs(held_out, mirror), means)
        half = torch.randperm(len(scores), generator=generator) < len(scores) // 2
        for rate in pass_rates:
            threshold = pass_threshold(scores[half], rate)
            flagged[rate].append((scores[~half] < threshold).float().mean().item())
    return {rate: torch.tensor(values).mean().item() for rate, values in flagged.items()}


def final_check(data, name, pass_rate, seed):
    """The chosen setting trained on train/ (epoch chosen on valid/ as train.py does is left to
    train.py itself; here: the last epoch), then test/, not_flowers, calibration."""
    setting = SETTINGS[name]
    mirror = mirror_of(setting)
    heads = train_heads(setting, inputs_of(data["train"], mirror), data["train"]["labels"],
                        data["class_count"], seed)
    results = {}
    logits = {split: mean_logits(heads, eval_inputs(data[split], mirror))
              for split in ("valid", "test")}
    for split in ("valid", "test"):
        results[f"{split}_accuracy"] = (logits[split].argmax(1) == data[split]["labels"]
                                        ).float().mean().item()
    temperature = fit_temperature(logits["valid"], data["valid"]["labels"])
    results["temperature"] = temperature
    for label, scale in (("before", 1.0), ("after", temperature)):
        results[f"test_ece_{label}"] = expected_calibration_error(
            (logits["test"] / scale).softmax(1), data["test"]["labels"])
    means = class_means(inputs_of(data["train"], mirror), data["train"]["labels"],
                        data["class_count"])
    threshold = pass_threshold(nearest_similarity(eval_inputs(data["valid"], mirror), means),
                              pass_rate)
    results["threshold"] = threshold
    for split in ("test", "not_flowers"):
        if split in data:
            scores = nearest_similarity(eval_inputs(data[split], mirror), means)
            results[f"{split}_flagged"] = (scores < threshold).float().mean().item()
            if split == "not_flowers":
                probabilities = (mean_logits(heads, eval_inputs(data[split], mirror))
                                 / temperature).softmax(1)
                results["not_flowers_over_half"] = (probabilities.max(1).values > 0.5
                                                    ).float().mean().item()
    return results


# --- trained stages ---------------------------------------------------------------------------

def stage_sources(args):
    """{split: (root, paths, labels)} of train, valid, test (and not_flowers), of the first
    --classes classes; and the number of classes."""
    class_to_idx, splits = find_splits(args.data_dir)
    count = args.classes or len(class_to_idx)
    sources = {}
    for name, split in splits.items():
        kept = [i for i, label in enumerate(split.labels) if label < count]
        sources[name] = (split.root, [split.paths[i] for i in kept],
                         [split.labels[i] for i in kept])
    if args.not_flowers:
        paths = list_images(args.not_flowers)
        sources["not_flowers"] = (Path(args.not_flowers), paths, [-1] * len(paths))
    return sources, count


def load_activations(args):
    """{split: {"activations" [N, 2, C, H, W] float16 (the image's, its mirror image's),
    "labels"}} of readable images, and the number of classes: train.py's extraction and cache
    (--cache_dir) for --train_stages."""
    sources, class_count = stage_sources(args)
    return activations_of(sources, args.train_stages, args.cache_dir, args.workers), class_count


def activations_of(sources, layers, cache_dir, workers=None):
    """{split: {"activations", "labels"}}, as load_activations returns them, of sources
    ({split: (root, paths, labels)}): the activations entering the last `layers` stages."""
    backbone = feature_backbone()
    bottom, _ = split_backbone(backbone, layers)
    extractor = FeatureExtractor(backbone, CPU, cache_dir=cache_dir, workers=workers,
                                 images=sum(len(paths) for _, paths, _ in sources.values()),
                                 bottom=bottom, trained_stages=layers)
    data = {}
    for name, (root, paths, labels) in sources.items():
        started = time.perf_counter()
        activations, ok = extractor.features(root, paths, eval_transform(backbone.preprocess),
                                             description=name, mirror=True)
        data[name] = {"activations": activations[ok],
                      "labels": torch.tensor(labels, dtype=torch.long)[ok]}
        print(f"activations of {name}: {len(paths)} images, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return data


@torch.inference_mode()
def pretrained_features(data, layers):
    """The frozen path's data ({"plain", "mirror", "labels"} per split) from the activations,
    through the pretrained last stages."""
    _, top = split_backbone(build_backbone(DEFAULT_ARCH), layers)
    top.eval()

    def through(activations):
        with base.training_autocast(CPU):
            return torch.cat([top(batch.float()).float() for batch in activations.split(256)])

    return {name: {"plain": through(split["activations"][:, 0]).half(),
                   "mirror": through(split["activations"][:, 1]).half(),
                   "labels": split["labels"]} for name, split in data.items()}


def run_epochs(config, task, classifier):
    """train.py's Trainer epochs (its optimiser, schedule, loss and seeding), the last kept."""
    optimizer, scheduler = optim.make_optimizer(config, classifier, task.steps_per_epoch())
    criterion = optim.make_criterion(config, task.train_labels(),
                                       classifier.head[-1].out_features, CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for epoch in range(1, config.epochs + 1):
        torch.manual_seed(config.seed + epoch)
        task.model.train()
        loop.train_one_epoch(task.model, task.train_batches(epoch), optimizer, scheduler,
                                scaler, criterion, CPU)
    return task.model.eval()


def train_stage_task(setting, splits, layers, class_count, seed):
    """A StageTask trained as train.py trains it on splits["train"] (a fresh pretrained
    backbone each time: training changes its stages); splits: {name: {"activations",
    "labels"}}."""
    config = replace(train_config(setting), train_stages=layers, seed=seed,
                     mirror=mirror_of(setting))
    torch.manual_seed(seed)
    backbone = build_backbone(DEFAULT_ARCH)
    _, top = split_backbone(backbone, layers)
    classifier = ImageClassifier(backbone, build_head(backbone.feature_dim, class_count,
                                                      **loop.head_spec(config)))
    # The views train.py caches: the mirror image's where --mirror averages it in.
    data = {name: (split["activations"][:, :2 if mirrored(config.mirror, name) else 1],
                   split["labels"]) for name, split in splits.items()}
    data["train"] = (data["train"][0].unsqueeze(0), data["train"][1])
    task = StageTask(config, classifier, CPU, CachedInputs(data), top)
    run_epochs(config, task, classifier)
    return task


@torch.inference_mode()
def model_logits(model, batches):
    """float32 logits of a trained stages' model over batches of activations, under train.py's
    autocast."""
    with base.training_autocast(CPU):
        return torch.cat([model(inputs.float()).float() for inputs in batches])


def task_logits(task, split):
    return model_logits(task.model, (inputs for inputs, _ in task.eval_batches(split)))


def stage_score(setting, training, held_out, layers, class_count, seed):
    task = train_stage_task(setting, {"train": training, "held_out": held_out}, layers,
                            class_count, seed)
    return (task_logits(task, "held_out").argmax(1) == held_out["labels"]).float().mean().item()


def cross_validate_stages(args, data, features, class_count):
    """{setting: (mean, std, seconds per fold)} on the same folds: the frozen settings on the
    pretrained features, the others training --train_stages stages."""
    pool = {key: torch.cat([data["train"][key], data["valid"][key]])
            for key in ("activations", "labels")}
    feature_pool = pooled(features)
    fold_of = stratified_folds(pool["labels"], args.folds, args.seed)
    results = {}
    for name in args.stage_settings:
        setting, started = STAGE_SETTINGS[name], time.perf_counter()
        scores = []
        for fold in range(args.folds):
            if name.startswith("frozen"):
                scores.append(fit_and_score(setting, subset(feature_pool, fold_of != fold),
                                            subset(feature_pool, fold_of == fold), class_count,
                                            args.seed))
            else:
                scores.append(stage_score(setting, subset(pool, fold_of != fold),
                                          subset(pool, fold_of == fold), args.train_stages,
                                          class_count, args.seed))
            print(f"    {name} fold {fold}: {100 * scores[-1]:.2f} % "
                  f"({time.perf_counter() - started:.0f} s so far)", flush=True)
        scores = torch.tensor(scores)
        results[name] = (scores.mean().item(), scores.std().item(),
                         (time.perf_counter() - started) / args.folds)
        print(f"  {name:32s} {100 * results[name][0]:.2f} ± {100 * results[name][1]:.2f} %"
              f"  ({results[name][2]:.0f} s per fold)", flush=True)
    return results


def final_check_stages(data, name, layers, class_count, pass_rate, seed):
    """A stage setting trained on train/ (last epoch), then valid/, test/ and not_flowers: the
    accuracy, and the unknown verdict as train.py computes it (class means and threshold of the
    trained stages' features)."""
    task = train_stage_task(STAGE_SETTINGS[name], data, layers, class_count, seed)
    results = {f"{split}_accuracy": (task_logits(task, split).argmax(1)
                                     == data[split]["labels"]).float().mean().item()
               for split in ("valid", "test")}
    means = class_means(*task.frozen_features("train"), class_count)
    threshold = pass_threshold(nearest_similarity(task.frozen_features("valid")[0], means),
                               pass_rate)
    results["threshold"] = threshold
    for split in ("test", "not_flowers"):
        if split in data:
            scores = nearest_similarity(task.frozen_features(split)[0], means)
            results[f"{split}_flagged"] = (scores < threshold).float().mean().item()
    return results


def main_stages(args):
    """--train_stages N: the frozen head against training the last N stages with it."""
    torch.set_num_threads(2)  # the stages' convolutions use both cores (the head's do not)
    data, class_count = load_activations(args)
    features = pretrained_features(data, args.train_stages)
    print(f"cross-validation: {args.folds} stratified folds of train+valid "
          f"({len(data['train']['labels']) + len(data['valid']['labels'])} images, "
          f"{class_count} classes), seed {args.seed}, held-out accuracy at the last epoch; "
          f"the last {args.train_stages} stages trained")
    results = cross_validate_stages(args, data, features, class_count)
    chosen = choose(results)
    print(f"chosen (best mean): {chosen}")
    features["class_count"] = class_count
    final = {}
    for kind in ("frozen", "stages"):  # the best of each kind, checked once on test/
        names = [name for name in results if name.startswith(kind)]
        if not names:
            continue
        best = max(names, key=lambda name: results[name][0])
        final[best] = (final_check(features, best, args.pass_rate, args.seed) if kind == "frozen"
                       else final_check_stages(data, best, args.train_stages, class_count,
                                               args.pass_rate, args.seed))
        print(f"last check of {best} (trained on train/, last epoch): "
              + ", ".join(f"{key} {value:.4f}" for key, value in final[best].items()),
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cv": results, "chosen": chosen, "final": final},
                                              indent=1))
    return {"cv": results, "chosen": chosen, "final": final}


def main(args):
    if args.train_stages:
        return main_stages(args)
    # The head is small: one thread trains it about 7x faster than two on a busy 2-core CPU
    # (measured), and leaves a core for a second run.
    torch.set_num_threads(1)
    data = load_features(args)
    print(f"cross-validation: {args.folds} stratified folds of train+valid "
          f"({len(data['train']['labels']) + len(data['valid']['labels'])} images), seed "
          f"{args.seed}, held-out accuracy at the last epoch (mean ± std over folds)")
    results, fold_of = cross_validate(data, args.settings, args.folds, args.seed)
    chosen = choose(results)
    print(f"chosen (best mean): {chosen} {SETTINGS[chosen]}; the one-standard-error rule would "
          f"take {one_standard_error(results, args.folds)}")
    mirror = mirror_of(SETTINGS[chosen])
    rates = (0.9, 0.93, 0.95, 0.97, 0.99)
    flagged = cv_flag_rate(data, fold_of, args.folds, mirror, rates, args.seed)
    print("unseen flowers flagged unknown (CV) per pass rate: " + ", ".join(
        f"{rate:.0%}: {value:.1%}" for rate, value in flagged.items()))
    final = final_check(data, chosen, args.pass_rate, args.seed)
    print("last check of the chosen setting (trained on train/, last epoch): " + ", ".join(
        f"{key} {value:.4f}" for key, value in final.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"cv": results, "chosen": chosen, "cv_flagged": flagged, "final": final}, indent=1))
    return {"cv": results, "chosen": chosen, "cv_flagged": flagged, "final": final}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
