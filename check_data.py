"""Check a photo folder before training: duplicates, leaks between splits, unreadable and tiny
images, class counts, and photos likely filed under the wrong class.

    python check_data.py photos/                         # one folder per class, split as train.py
    python check_data.py flowers/ --save_dir runs/check  # a train/valid/test layout
    python check_data.py photos/ --fix                   # also write a cleaned split manifest

It reads the backbone features from train.py's feature cache (computing what is missing, which a
training run then reuses), writes data_report.json and contact sheets (data_check/*.png) to
--save_dir, and never moves or deletes a file: --fix writes cleaned_manifest.json, which
`train.py DIR --split_from` reads.
"""
from flower_classifier.cli.check_data import get_args_parser, main
from flower_classifier.cli.runner import run_cli

if __name__ == "__main__":
    run_cli(main, get_args_parser())
