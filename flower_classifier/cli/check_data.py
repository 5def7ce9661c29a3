"""check_data.py's command line: the data check of a folder, on train.py's feature cache, and
--fix's cleaned manifest.

    python check_data.py photos/           # the usage: check_data.py's docstring
"""
import argparse
from pathlib import Path

from flower_classifier.cli.options import (
    HelpFormatter,
    add_gpu_argument,
    non_negative_int,
    select_device,
)
from flower_classifier.cli.runner import run_cli
from flower_classifier.data.corrections import (
    apply_corrections,
    corrections_line,
    load_corrections,
)
from flower_classifier.data.loading import default_workers
from flower_classifier.data.split import (
    DEFAULT_FRACTIONS,
    load_dataset,
    manifest_of_layout,
    parse_fractions,
    write_manifest,
)
from flower_classifier.data.transforms import eval_transform
from flower_classifier.datacheck.cleaning import cleaned_manifest
from flower_classifier.datacheck.findings import FOLDS, NEAR_THRESHOLD
from flower_classifier.datacheck.report import TINY_SIDE, check_dataset, summary_lines
from flower_classifier.models.backbones import DEFAULT_ARCH, arch_choices, build_backbone
from flower_classifier.models.features import (
    FeatureExtractor,
    default_cache_dir,
    split_features,
)
from flower_classifier.training.config import MIRROR_CHOICES, family_default
from flower_classifier.utils.errors import UserError

DESCRIPTION = ("Check a photo folder before training: duplicates, leaks between splits, "
               "unreadable and tiny\nimages, class counts, and photos likely filed under the "
               "wrong class.")
CLEANED_MANIFEST_NAME = "cleaned_manifest.json"


def get_args_parser():
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("data_dir", help="one folder per class, or train/ and valid/ (and "
                        "optionally test/) each with one folder per class")
    parser.add_argument("--save_dir", default=".", help="where data_report.json, the contact "
                        "sheets and (with --fix) the cleaned manifest go")
    parser.add_argument("--split", default=",".join(map(str, DEFAULT_FRACTIONS.values())),
                        help="train,valid[,test] fractions of a one-folder data_dir, as train.py")
    parser.add_argument("--split_from", default=None, metavar="MANIFEST",
                        help="check the split this manifest records instead of splitting anew")
    parser.add_argument("--corrections", default=None, metavar="FILE",
                        help="check the folder with a corrections.json's decisions (studio.py) "
                        "applied: dropped photos left out, relabelled ones under their class")
    parser.add_argument("--fix", action="store_true", help="write cleaned_manifest.json: the "
                        "split without the duplicates, leaks, unreadable and likely "
                        "mislabelled files (the files themselves stay)")
    parser.add_argument("--near_threshold", type=float, default=NEAR_THRESHOLD,
                        help="correlation of the small greyscale thumbnails of two feature "
                        "neighbours from which they are near-copies (chosen on a messy folder: "
                        "benchmarks/messy_folder.py)")
    parser.add_argument("--tiny_side", type=non_negative_int, default=TINY_SIDE,
                        help="report images whose shorter side is below this many pixels")
    parser.add_argument("--folds", type=int, default=FOLDS,
                        help="folds of the out-of-fold predictions that find mislabelled photos")
    parser.add_argument("--arch", default=DEFAULT_ARCH, choices=arch_choices(), metavar="ARCH",
                        help="backbone whose features are compared (use the one you train with, "
                        "so its cache is shared)")
    parser.add_argument("--mirror", choices=MIRROR_CHOICES, default=family_default("mirror"),
                        help="as train.py's --mirror, so the check reads the features it cached")
    parser.add_argument("--cache_dir", default=str(default_cache_dir()),
                        help="the feature cache train.py uses")
    parser.add_argument("--workers", type=non_negative_int, default=default_workers(),
                        help="processes decoding images")
    add_gpu_argument(parser)
    return parser


def run_check(args):
    """The report of the check (written to --save_dir) and the manifest it checked (None for a
    train/valid/test layout)."""
    dataset = load_dataset(args.data_dir, parse_fractions(args.split), args.split_from)
    if args.corrections:
        counts = {}
        dataset = apply_corrections(dataset, load_corrections(args.corrections), counts)
        print(corrections_line(args.corrections, counts))
    if args.folds < 2:
        raise UserError(f"--folds {args.folds}: the out-of-fold predictions need at least 2")
    backbone = build_backbone(args.arch)
    if not backbone.pretrained:
        raise UserError(f"--arch {args.arch} has no pretrained features to compare; use "
                        f"--arch {DEFAULT_ARCH}")
    splits = dataset.splits
    extractor = FeatureExtractor(backbone, select_device(args.gpu), cache_dir=args.cache_dir,
                                 workers=args.workers,
                                 images=sum(len(split.paths) for split in splits.values()))
    features = split_features(extractor, splits, eval_transform(backbone.preprocess),
                              args.mirror)
    report = check_dataset(dataset.class_to_idx, splits, features, args.save_dir,
                           args.cache_dir, near_threshold=args.near_threshold,
                           tiny_side=args.tiny_side, folds=args.folds)
    return report, dataset.manifest


def main(args):
    report, manifest = run_check(args)
    print("\n".join(summary_lines(report, args.save_dir)))
    if args.fix:  # a layout's manifest hashes every file: made only when it is needed
        cleaned, dropped = cleaned_manifest(manifest or manifest_of_layout(args.data_dir),
                                            args.data_dir, report)
        path = Path(args.save_dir) / CLEANED_MANIFEST_NAME
        write_manifest(cleaned, path)
        print(f"wrote {path}: {len(cleaned['files'])} files, {len(dropped)} left out "
              f"(train with: train.py {args.data_dir} --split_from {path})")
    return report


def run(argv=None):
    """The console command (pyproject.toml), as `python check_data.py`."""
    run_cli(main, get_args_parser(), argv)
