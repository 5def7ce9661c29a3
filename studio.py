"""Open a photo folder in the studio: a local web app to look through it, decide, and retrain.

    python studio.py photos/                       # then open the address it prints
    python studio.py photos/ --save_dir studio --port 8100
    python studio.py photos/ --host 0.0.0.0 --token SECRET      # from a phone on the network
    python train.py photos/ --corrections studio/corrections.json

photos/ holds one folder per class, or train/ and valid/ (and optionally test/). The page shows
the class counts and the data check's findings (duplicates, likely mislabelled photos, unreadable
and tiny images) as galleries; each photo is kept, dropped or relabelled with one click or key,
each decision written at once to save_dir/corrections.json (the photos themselves never move).
A quick retrain trains the head on the cached features with the decisions applied and shows the
new valid accuracy and the mistakes, each with its heatmap.
"""
from flower_classifier.cli.runner import run_cli
from flower_classifier.cli.studio import get_args_parser, main

if __name__ == "__main__":
    run_cli(main, get_args_parser())
