"""download_flowers.py's command line over data.download.download_flowers.

    python download_flowers.py --output flowers       # the usage: download_flowers.py's docstring
"""
import argparse

from flower_classifier.cli.runner import run_cli
from flower_classifier.data.download import (
    ARCHIVE_NAME,
    LABELS_NAME,
    OFFICIAL_URL,
    SETID_NAME,
    SPLIT_SOURCES,
    download_flowers,
)

DESCRIPTION = """Download the Oxford-102 flowers into the train/, valid/, test/ folder layout that train.py reads.

    python download_flowers.py --output flowers
    python download_flowers.py --output flowers --split swap   # 6149 training images instead of 1020
"""


def get_args_parser():
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="flowers", metavar="DIR",
                        help="folder to create train/, valid/, test/ and cat_to_name.json in "
                             "(default: flowers)")
    parser.add_argument("--download_dir", default=None, metavar="DIR",
                        help=f"folder that keeps {ARCHIVE_NAME}, {LABELS_NAME} and {SETID_NAME}; "
                             "files already there are not downloaded again (default: OUTPUT/.downloads)")
    parser.add_argument("--base_url", default=OFFICIAL_URL, metavar="URL",
                        help=f"where the three files are fetched from, e.g. a mirror or a file:// "
                             f"folder (default: {OFFICIAL_URL})")
    parser.add_argument("--split", default="official", choices=sorted(SPLIT_SOURCES),
                        help="official: the dataset's own train/valid/test ids (1020/1020/6149 "
                             "images, 10 per class for training); swap: its test ids for training "
                             "and its train ids for testing (6149/1020/1020) (default: official)")
    parser.add_argument("--force", action="store_true",
                        help="replace train/, valid/ and test/ when OUTPUT already holds images "
                             "(default: refuse)")
    return parser


def main(args):
    counts = download_flowers(args.output, args.download_dir, args.base_url, args.split,
                              args.force)
    print(f"done: {counts['train']} train, {counts['valid']} valid and {counts['test']} test images "
          f"in {args.output}")


def run(argv=None):
    """The console command (pyproject.toml), as `python download_flowers.py`."""
    run_cli(main, get_args_parser(), argv)
