"""The studio at the size of a real folder: how long GET /api/state takes and how large it is,
and how long one click's decision takes to reach the disk as corrections.json grows (each
decision rewrites the whole file atomically, with an fsync).

    python benchmarks/studio_scale.py ../shared/data/flowers102 --decisions 0 1000 7000

The features and the data check play no part in these figures: the studio is built over the
folder's photos with empty findings.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import torch  # noqa: E402

from flower_classifier.data.corrections import record_decisions  # noqa: E402
from flower_classifier.data.folders import find_splits  # noqa: E402
from flower_classifier.data.split import Dataset  # noqa: E402
from flower_classifier.models.backbones import build_backbone  # noqa: E402
from flower_classifier.studio.state import Studio, StudioOptions  # noqa: E402

EMPTY = {"exact_duplicates": [], "near_duplicates": [], "mislabelled": [], "unreadable": [],
         "tiny": []}


def build(data_dir, save_dir):
    class_to_idx, splits = find_splits(data_dir)
    features = {name: (torch.zeros(len(split.paths), 1), torch.ones(len(split.paths),
                                                                    dtype=torch.bool))
                for name, split in splits.items()}
    return Studio(StudioOptions(data_dir, save_dir=str(save_dir), cache_dir=None),
                  Dataset(class_to_idx, splits), features, EMPTY,
                  build_backbone("efficientnet_lite0"))


def timed(function, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("--decisions", type=int, nargs="*", default=[0, 1000, 7000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as save_dir:
        studio = build(args.data_dir, save_dir)
        seconds, state = timed(lambda: json.dumps(studio.state()).encode(), args.repeats)
        print(f"{len(studio.photos)} photos, {len(studio.classes)} classes: GET /api/state "
              f"{len(state) / 1e6:.2f} MB in {seconds * 1000:.0f} ms (best of {args.repeats})")
        for count in args.decisions:
            Path(studio.corrections_path).unlink(missing_ok=True)
            if count:
                record_decisions(studio.corrections_path,
                                 {photo.path: None for photo in studio.photos[:count]})
            last = studio.photos[-1].id
            seconds, _ = timed(lambda: studio.decide([{"id": last, "label": None}]),
                               args.repeats)
            size = Path(studio.corrections_path).stat().st_size
            print(f"one decision with {count} already made: {seconds * 1000:.1f} ms "
                  f"(corrections.json {size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
