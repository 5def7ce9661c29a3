#!/usr/bin/env bash
# The main job on a fresh machine: install, get the flowers (unless a data folder is given),
# train with the defaults, then name the flower in one test photo and draw the prediction.
#   bash run_example.sh                               # downloads Oxford-102 into ./flowers
#   bash run_example.sh ../shared/data/flowers102     # any folder with train/ valid/ [test/],
#   bash run_example.sh photos                        # or of class folders (split automatically)
set -euo pipefail
cd "$(dirname "$0")"
data=${1:-flowers}
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
[ -d "$data" ] || .venv/bin/python download_flowers.py --output "$data"
.venv/bin/python train.py "$data" --save_dir runs/example
photo=$({ find "$data/test" "$data/valid" "$data" -type f -iname '*.jpg' 2>/dev/null || true; } \
    | sort | sed -n 1p)
.venv/bin/python predict.py "$photo" runs/example/checkpoint.pth --top_k 5 \
    --category_names cat_to_name.json --plot runs/example/prediction.png
