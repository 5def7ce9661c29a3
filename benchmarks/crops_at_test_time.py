"""Test-time crops (issue 22's "what else is cheap"): does averaging the head's predictions over
more crops of each photo than the image and its mirror image (predict.py's --mirror predict, 2
backbone passes) score better, by more than the folds' noise, and at what cost per photo?

    python benchmarks/crops_at_test_time.py ../shared/data/flowers102
    python benchmarks/crops_at_test_time.py ../shared/data/flowers102 --seed 1 --json crops.json

Protocol. Each image of train/ and valid/ is decoded once and cut into VIEWS: the five 224 px
crops (torchvision's FiveCrop: four corners and the centre) of the image resized to 256 px on
its shorter side (eval_transform's size and filter; its centre crop is eval_transform's own
view), the centre crop of the image resized to 224 (the whole shorter side: zoomed out) and to
288 (zoomed in), each with its mirror image: 14 views. Their frozen Lite0 features (train.py's
FeatureExtractor engine, OpenVINO bf16 on a CPU that has it) are extracted once and kept in
--cache_dir, in a file named by the weights, the engine, the views' transform and the image
list. test/ is never read. Unreadable images are left out.

The folds and the head are quality.py's: --folds stratified folds of train+valid (--seed), the
head of --setting (train.py's default for the head alone, "sqrt, batch 128, lr 0.002, 40
epochs", --mirror predict) trained as train.py trains it (quality.train_heads) on the centre
crops of the other folds, the last epoch kept.
Each held-out image is then predicted from each crop set of CROP_SETS two ways: the softmax
probabilities of its views averaged ("probabilities"), and the views' features averaged before
the head ("features": what predict.py does with the image and its mirror image today). The
baseline is today's: centre + mirror, features averaged; each crop set's difference from it is
paired (the same folds and heads), mean ± std over the folds.

Trained stages (--train_stages N; train.py's default is 2): the activations that enter the
backbone's last N stages are cached per view instead (the backbone's bottom through the same
engine, as quality.py --train_stages caches them), and on each fold the stages train with the
head as train.py trains them (quality.train_stage_task, --setting's default "stages, 12 epochs,
lr 3e-4": the centre crops' activations, flipped at random); every held-out view then goes
through the trained stages, and the crop sets are scored on those features the same two ways.

Cost: each crop set's views of the same --time_images valid/ images extracted (decoding
included, --workers 0: the process's CPU seconds count it), per photo, and relative to the
baseline's 2 views.
"""
import argparse
import hashlib
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.transforms import functional  # noqa: E402

import quality  # noqa: E402
from flower_classifier.cli.options import HelpFormatter, non_negative_int, positive_int
from flower_classifier.cli.runner import run_cli
from flower_classifier.data.folders import find_splits
from flower_classifier.data.images import is_readable
from flower_classifier.data.loading import ImageFiles, image_loader
from flower_classifier.models.features import FeatureExtractor
from flower_classifier.models.stages import split_backbone
from flower_classifier.training.config import family_default
from flower_classifier.training.tasks import cached
from flower_classifier.utils.files import write_json

POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")  # FiveCrop's order
CENTRE = (256, "centre", False)  # eval_transform's view: what the head trains on
MIRROR = (256, "centre", True)


def views_of(side, positions, mirrors=(False, True)):
    """(shorter side, position, mirrored) of each crop of the image resized to side."""
    return tuple((side, position, mirrored) for mirrored in mirrors for position in positions)


FIVE = views_of(256, POSITIONS, (False,))
TEN = views_of(256, POSITIONS)
WHOLE = views_of(224, ("centre",))
ZOOM = views_of(288, ("centre",))
VIEWS = TEN + WHOLE + ZOOM  # all that is extracted
# name: the views whose predictions are averaged
CROP_SETS = {
    "centre": (CENTRE,),
    "centre + mirror (today)": (CENTRE, MIRROR),
    "five crops": FIVE,
    "ten crops (five + mirrors)": TEN,
    "centre, whole (224)": (CENTRE, WHOLE[0]),
    "centre, whole + mirrors": (CENTRE, MIRROR, *WHOLE),
    "centre, whole, zoom (288) + mirrors": (CENTRE, MIRROR, *WHOLE, *ZOOM),
    "ten crops, whole + mirrors": TEN + WHOLE,
    "all 14 views": VIEWS,
}
BASELINE = ("centre + mirror (today)", "features")
METHODS = ("probabilities", "features")
# train.py's defaults: the head alone (--train_stages 0), and the trained stages
DEFAULT_SETTINGS = {False: "sqrt, batch 128, lr 0.002, 40 epochs",
                    True: "stages, 12 epochs, lr 3e-4"}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("data_dir", help="folder with train/ and valid/ (test/ is not read)")
    parser.add_argument("--cache_dir", default="/tmp/crops_at_test_time_cache",
                        help="where the views' features (or activations) are kept")
    parser.add_argument("--folds", type=positive_int, default=5, help="cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and the heads")
    parser.add_argument("--train_stages", type=int, default=0,
                        help="N > 0: train the backbone's last N stages with the head, on the "
                        "views' cached activations")
    parser.add_argument("--setting", default=None, choices=list(quality.SETTINGS),
                        metavar="NAME", help="quality.py's setting (default: train.py's, "
                        f"{DEFAULT_SETTINGS[False]!r}, or {DEFAULT_SETTINGS[True]!r} with "
                        f"--train_stages): {', '.join(quality.SETTINGS)}")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="the head's epochs instead of the setting's (for a quick check)")
    parser.add_argument("--min_epoch_steps", type=non_negative_int, default=None,
                        help="train.py's --min_epoch_steps instead of its default ("
                        f"{family_default('min_epoch_steps', 'stages')} with --train_stages, "
                        f"{family_default('min_epoch_steps')} without); 0 for a quick check: a "
                        "small folder passed once an epoch")
    parser.add_argument("--engine", default="auto", choices=("auto", "openvino", "torch"),
                        help="the backbone's engine, as train.py --engine")
    # One thread and no decoding processes: the benchmark shares a 2-core machine.
    parser.add_argument("--workers", type=int, default=0,
                        help="processes decoding images (0: in the main process)")
    parser.add_argument("--time_images", type=positive_int, default=128,
                        help="valid/ images each crop set's extraction is timed on")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures")
    return parser


class CropViews:
    """One image as a [views, 3, crop, crop] tensor: each view the crop at its position (FiveCrop)
    of the image resized to its shorter side with the backbone's filter, mirrored or not, and
    normalised as eval_transform does. Each size is resized once."""

    def __init__(self, preprocess, views):
        interpolation = transforms.InterpolationMode(preprocess.interpolation)
        self.views = views
        self.resizes = {side: transforms.Resize(side, interpolation=interpolation)
                        for side in sorted({side for side, _, _ in views})}
        self.five_crop = transforms.FiveCrop(preprocess.crop)
        self.normalise = transforms.Compose([
            transforms.ToTensor(), transforms.Normalize(preprocess.mean, preprocess.std)])

    def __call__(self, image):
        crops = {side: dict(zip(POSITIONS, self.five_crop(resize(image))))
                 for side, resize in self.resizes.items()}
        return torch.stack([self.normalise(functional.hflip(crops[side][position]) if mirrored
                                           else crops[side][position])
                            for side, position, mirrored in self.views])

    def __repr__(self):  # names the exact transform in the cache key
        return (f"CropViews({list(self.resizes.values())}, {self.five_crop}, {self.normalise}, "
                f"views={self.views})")


@torch.inference_mode()
def view_features(extractor, paths, views, workers, batch_size=16):
    """([images, views, features] float16, ok [images]): each image decoded once, all its views
    through the backbone in one batch; ok is False for an unreadable file."""
    preprocess = extractor.spec.preprocess
    dataset = ImageFiles(paths, CropViews(preprocess, views), preprocess.crop,
                         draft=max(side for side, _, _ in views))
    features, ok = [], []
    for images, _, good in image_loader(dataset, batch_size, workers, quality.CPU):
        features.append(extractor.engine(images.flatten(0, 1)).unflatten(0, images.shape[:2])
                        .half())
        ok.append(good)
    return torch.cat(features), torch.cat(ok)


def load_view_features(args, extractor):
    """{"train", "valid": {"views" [N, len(VIEWS), ...] float16, "labels"}, "class_count"}:
    the views' features (or, with a bottom, their activations), extracted once, then read from
    --cache_dir."""
    class_to_idx, splits = find_splits(args.data_dir)
    backbone, engine = extractor.spec, extractor.engine
    images = "\n".join(path for split in ("train", "valid") for path in splits[split].paths)
    made_by = (f"{backbone.name} {backbone.weights} {extractor.output} {engine.name} "
               f"{engine.precision} "
               f"{CropViews(backbone.preprocess, VIEWS)!r} {Path(args.data_dir).resolve()} "
               f"{hashlib.sha256(images.encode()).hexdigest()}")

    def extract():
        data = {"class_count": len(class_to_idx)}
        for name in ("train", "valid"):  # test/ is never read
            started = time.perf_counter()
            split = splits[name]
            views, ok = view_features(extractor, split.paths, VIEWS, args.workers)
            data[name] = {"views": views[ok],
                          "labels": torch.tensor(split.labels, dtype=torch.long)[ok]}
            print(f"{len(VIEWS)} views of {name}: {int(ok.sum())} images, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        return data

    return quality.cached(args.cache_dir, "crops", made_by, extract)


def train_on_centre(setting, training, class_count, seed):
    """quality.py's head(s) trained on the centre crops as train.py trains them (the setting's
    --mirror: the mirror images' features averaged in with "all")."""
    centre = {"plain": training["views"][:, VIEWS.index(CENTRE)],
              "mirror": training["views"][:, VIEWS.index(MIRROR)]}
    inputs = quality.inputs_of(centre, quality.mirror_of(setting))
    return quality.train_heads(setting, inputs, training["labels"], class_count, seed)


def train_stages(setting, training, held_out, layers, class_count, seed):
    """([head], features [N, len(VIEWS), D] of the held-out views): the last `layers` stages
    and the head trained on the centre crops' activations as train.py trains them, each
    held-out view through the trained stages."""
    centre = [VIEWS.index(CENTRE), VIEWS.index(MIRROR)]
    task = quality.train_stage_task(
        setting, {"train": {"activations": training["views"][:, centre],
                            "labels": training["labels"]}}, layers, class_count, seed)
    features = torch.stack([cached.stage_features(task.model, held_out["views"][:, [index]],
                                                 quality.CPU) for index in range(len(VIEWS))], 1)
    return [task.model.head], features


def crop_set_predictions(heads, views):
    """{(crop set, method): predicted class of each image} of features [N, len(VIEWS), D]."""
    probabilities = torch.stack([quality.mean_logits(heads, views[:, index]).softmax(1)
                                 for index in range(len(VIEWS))], 1)
    predictions = {}
    for name, crop_set in CROP_SETS.items():
        index = [VIEWS.index(view) for view in crop_set]
        predictions[name, "probabilities"] = probabilities[:, index].mean(1).argmax(1)
        # As predict.py averages the image's and its mirror image's features (float16 inputs).
        averaged = views[:, index].float().mean(1).to(views.dtype)
        predictions[name, "features"] = quality.mean_logits(heads, averaged).argmax(1)
    return predictions


def fold_accuracies(data, setting, folds, seed, layers=0):
    """{(crop set, method): held-out accuracy of each fold}, quality.py's folds and head (and
    the last `layers` stages trained with it)."""
    pool = {key: torch.cat([data["train"][key], data["valid"][key]])
            for key in ("views", "labels")}
    fold_of = quality.stratified_folds(pool["labels"], folds, seed)
    accuracies = {}
    for fold in range(folds):
        started = time.perf_counter()
        training, held_out = (quality.subset(pool, fold_of != fold),
                              quality.subset(pool, fold_of == fold))
        if layers:
            heads, features = train_stages(setting, training, held_out, layers,
                                           data["class_count"], seed)
        else:
            heads, features = (train_on_centre(setting, training, data["class_count"], seed),
                               held_out["views"])
        for key, predicted in crop_set_predictions(heads, features).items():
            accuracy = (predicted == held_out["labels"]).float().mean().item()
            accuracies.setdefault(key, []).append(accuracy)
        print(f"  fold {fold}: today's {100 * accuracies[BASELINE][-1]:.2f} %, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    return accuracies


def summarise(accuracies):
    """{(crop set, method): {"folds", "mean", "std", "gain_mean", "gain_std"}} in points; gain:
    the paired difference from the baseline, fold by fold."""
    baseline = torch.tensor(accuracies[BASELINE]) * 100
    summary = {}
    for key, values in accuracies.items():
        scores = torch.tensor(values) * 100
        gains = scores - baseline
        summary[key] = {"folds": scores.tolist(), "mean": scores.mean().item(),
                        "std": scores.std().item(), "gain_mean": gains.mean().item(),
                        "gain_std": gains.std().item()}
    return summary


def extraction_seconds(extractor, data_dir, count, workers):
    """(images, {crop set: (CPU seconds, wall seconds) per image}) of extracting each crop
    set's views of the same valid/ images (count at most, spread over its classes)."""
    paths = [path for path in find_splits(data_dir)[1]["valid"].paths if is_readable(path)]
    paths = paths[::max(1, len(paths) // count)][:count]
    view_features(extractor, paths[:2], VIEWS, workers)  # compiles the engine outside the timing
    seconds = {}
    for name, crop_set in CROP_SETS.items():
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        view_features(extractor, paths, crop_set, workers)
        seconds[name] = ((time.process_time() - cpu_started) / len(paths),
                         (time.perf_counter() - wall_started) / len(paths))
    return len(paths), seconds


def print_table(summary, seconds):
    base_cpu = seconds[BASELINE[0]][0]
    print("crop set | passes | probabilities averaged: mean ± std, gain ± std | features "
          "averaged: mean ± std, gain ± std | ms per photo CPU, wall | x today's")
    for name, crop_set in CROP_SETS.items():
        figures = [summary[name, method] for method in METHODS]
        cells = [f"{one['mean']:.2f} ± {one['std']:.2f}, {one['gain_mean']:+.2f} ± "
                 f"{one['gain_std']:.2f}" for one in figures]
        cpu, wall = seconds[name]
        print(f"  {name:36s} | {len(crop_set):2d} | {cells[0]} | {cells[1]} | "
              f"{1000 * cpu:.1f}, {1000 * wall:.1f} | {cpu / base_cpu:.2f}x")


def main(args):
    # The head is small and the machine shared: one thread (quality.py measured it faster).
    torch.set_num_threads(1)
    name = args.setting or DEFAULT_SETTINGS[args.train_stages > 0]
    setting = dict(quality.SETTINGS[name])
    if args.epochs:
        setting["epochs"] = args.epochs
    if args.min_epoch_steps is not None:
        setting["min_epoch_steps"] = args.min_epoch_steps
    backbone = quality.feature_backbone()
    extractor = FeatureExtractor(backbone, quality.CPU, workers=args.workers, engine=args.engine)
    if args.train_stages:  # what is cached: the activations that enter the trained stages
        bottom, _ = split_backbone(backbone, args.train_stages)
        data = load_view_features(args, FeatureExtractor(
            backbone, quality.CPU, workers=args.workers, engine=args.engine, bottom=bottom,
            trained_stages=args.train_stages))
    else:
        data = load_view_features(args, extractor)
    # A prediction's cost: the whole backbone per view, whatever trained it.
    images, seconds = extraction_seconds(extractor, args.data_dir, args.time_images,
                                         args.workers)
    print(f"cross-validation: {args.folds} stratified folds of train+valid "
          f"({len(data['train']['labels']) + len(data['valid']['labels'])} images), seed "
          f"{args.seed}, {name} {setting}, the last {args.train_stages} stages trained, on the "
          f"centre crops; held-out "
          f"accuracy at the last epoch, %; gain: paired difference from today's (centre + "
          f"mirror, features averaged); extraction timed on {images} valid/ images "
          f"({extractor.engine.name} {extractor.engine.precision}, decoding included)")
    summary = summarise(fold_accuracies(data, setting, args.folds, args.seed,
                                        args.train_stages))
    print_table(summary, seconds)
    results = {"setting": setting, "train_stages": args.train_stages, "seed": args.seed,
               "engine": extractor.engine.name,
               "crop_sets": {name: {"passes": len(crop_set),
                                    "cpu_seconds_per_image": seconds[name][0],
                                    "wall_seconds_per_image": seconds[name][1],
                                    **{method: summary[name, method] for method in METHODS}}
                             for name, crop_set in CROP_SETS.items()}}
    if args.json:
        write_json(results, args.json)
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser())
