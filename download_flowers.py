"""Download the Oxford-102 flowers into the train/, valid/, test/ folder layout that train.py reads.

    python download_flowers.py --output flowers
    python download_flowers.py --output flowers --split swap   # 6149 training images instead of 1020
"""
from flower_classifier.cli.download_flowers import get_args_parser, main
from flower_classifier.cli.runner import run_cli

if __name__ == "__main__":
    run_cli(main, get_args_parser())
