"""check_data.py's command line: the data check of a folder, on train.py's feature cache, and
--fix's cleaned manifest.

    python check_data.py photos/           # the usage: check_data.py's docstring
"""
import argparse
from pathlib import Path

from flower_classifier.cli.options import (
    HelpFormatter,
    add_gpu_argument,
    add_threads_argument,
    category_names_from_flag,
    non_negative_int,
    select_device,
    use_threads,
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
from flower_classifier.datacheck.cleaning import cleaned_manifest
from flower_classifier.datacheck.findings import FOLDS, NEAR_THRESHOLD
from flower_classifier.datacheck.report import TINY_SIDE, check_dataset, summary_lines
from flower_classifier.models.backbones import (
    DEFAULT_ARCH,
    DEFAULT_TRAIN_STAGES,
    arch_choices,
    build_backbone,
)
from flower_classifier.models.features import default_cache_dir, extraction_summary
from flower_classifier.training.config import MIRROR_CHOICES, family_default
from flower_classifier.training.run import class_names_given
from flower_classifier.training.tasks.cached import data_check_features
from flower_classifier.utils.errors import UserError
from flower_classifier.utils.files import new_run_folder, write_json

DESCRIPTION = ("Check a photo folder before training: duplicates, leaks between splits, "
               "unreadable and tiny\nimages, class counts, and photos likely filed under the "
               "wrong class.")
CLEANED_MANIFEST_NAME = "cleaned_manifest.json"
DEFAULT_SAVE_DIR = "runs/check"  # then runs/check2, runs/check3, ...
DROPPED_NAME = "fix_dropped.json"  # --fix: [{"path", "reason"}] of each file left out
DROPPED_SHOWN = 30                 # of them printed


def get_args_parser():
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("data_dir", help="one folder per class, or train/ and valid/ (and "
                        "optionally test/) each with one folder per class")
    parser.add_argument("--save_dir", default=None, help="where data_report.json, the contact "
                        "sheets and (with --fix) the cleaned manifest go (default: a new "
                        f"{DEFAULT_SAVE_DIR}, {DEFAULT_SAVE_DIR}2, ... per check)")
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
    parser.add_argument("--train_stages", type=non_negative_int, default=None,
                        help="as train.py's --train_stages, so the check reads the activations "
                        "it cached and passes them through the pretrained last stages (default: "
                        "train.py's for --arch)")
    parser.add_argument("--mirror", choices=MIRROR_CHOICES, default=family_default("mirror"),
                        help="as train.py's --mirror, so the check reads the features it cached")
    parser.add_argument("--category_names", default=None, metavar="JSON",
                        help="JSON file mapping class folder names to names, for the contact "
                        "sheets (default: data_dir/cat_to_name.json when present)")
    parser.add_argument("--cache_dir", default=str(default_cache_dir()),
                        help="the feature cache train.py uses")
    parser.add_argument("--workers", type=non_negative_int, default=default_workers(),
                        help="processes decoding images")
    add_gpu_argument(parser)
    add_threads_argument(parser)
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
    use_threads(args.threads)
    backbone = build_backbone(args.arch)
    if not backbone.pretrained:
        raise UserError(f"--arch {args.arch} has no pretrained features to compare; use "
                        f"--arch {DEFAULT_ARCH}")
    category_names_from_flag(args.category_names)  # a bad file: one error line
    class_names = class_names_given(args.data_dir, args.category_names, dataset.class_to_idx)
    stages = (DEFAULT_TRAIN_STAGES.get(backbone.name, 0) if args.train_stages is None
              else args.train_stages)
    features, extractor = data_check_features(backbone, select_device(args.gpu), dataset.splits, {
        "train_stages": stages, "mirror": args.mirror, "cache_dir": args.cache_dir,
        "workers": args.workers})
    print(f"features ready: {extraction_summary(extractor.computed, extractor.requested)}")
    report = check_dataset(dataset.class_to_idx, dataset.splits, features, args.save_dir,
                           args.cache_dir, near_threshold=args.near_threshold,
                           tiny_side=args.tiny_side, folds=args.folds, class_names=class_names)
    return report, dataset.manifest


def main(args):
    if args.save_dir is None:
        args.save_dir = str(new_run_folder(DEFAULT_SAVE_DIR))
    print(f"this check's files go to {args.save_dir}/")
    report, manifest = run_check(args)
    print("\n".join(summary_lines(report, args.save_dir)))
    if args.fix:  # a layout's manifest hashes every file: made only when it is needed
        cleaned, dropped = cleaned_manifest(manifest or manifest_of_layout(args.data_dir),
                                            args.data_dir, report)
        path = Path(args.save_dir) / CLEANED_MANIFEST_NAME
        write_manifest(cleaned, path)
        dropped_path = Path(args.save_dir) / DROPPED_NAME
        write_json([{"path": name, "reason": reason} for name, reason in dropped.items()],
                   dropped_path)
        print("\n".join(dropped_lines(dropped, dropped_path)))
        print(f"wrote {path}: {len(cleaned['files'])} files, {len(dropped)} left out "
              f"(train with: train.py {args.data_dir} --split_from {path})")
    return report


def dropped_lines(dropped, path, limit=DROPPED_SHOWN):
    """--fix's readable list of the files left out ({path: reason}), the first `limit` of them;
    the whole list is in path (the files themselves stay where they are)."""
    lines = [f"left out of the cleaned manifest ({len(dropped)}; all listed in {path}; the "
             "files stay where they are):"]
    lines += [f"  {name}: {reason}" for name, reason in list(dropped.items())[:limit]]
    if len(dropped) > limit:
        lines.append(f"  ... and {len(dropped) - limit} more in {path}")
    return lines


def run(argv=None):
    """The console command (pyproject.toml), as `python check_data.py`."""
    run_cli(main, get_args_parser(), argv)
