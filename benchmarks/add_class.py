"""Issue 34's adding a class: what a 103rd class costs, and what it does to the 102 old ones.

    python benchmarks/add_class.py ../shared/data/flowers102 ../shared/data/not_flowers
    python benchmarks/add_class.py ../shared/data/flowers102 ../shared/data/not_flowers \
        --flags "--train_stages 0" --flags ""

For each setting (train.py flags; --flags "" is the default), in a temporary folder of
symlinks (nothing copied): train.py on the 102 classes with an empty feature cache, then the
same command with a 103rd class folder, "not a flower", made of the non-flower photos (split
240/60/60 over train/valid/test, round-robin over their groups), into a new --save_dir and the
same cache. Prints per run: wall seconds, images through the backbone, the test accuracy on the
102 old classes' photos and, for the second run, on the new class's.
"""
import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from flower_classifier.cli import train  # noqa: E402
from flower_classifier.data.folders import list_images  # noqa: E402

NEW_CLASS = "103"
NEW_NAME = "not a flower"
SHARES = {"train": 4, "valid": 1, "test": 1}  # of every 6 non-flower photos


def layout(flowers, root):
    """root/{train,valid,test}/<class> as symlinks to the flowers' class folders, and
    cat_to_name.json (a symlink, then a file with the new class's name)."""
    for split in SHARES:
        (root / split).mkdir(parents=True)
        for folder in sorted((flowers / split).iterdir()):
            (root / split / folder.name).symlink_to(folder.resolve())
    (root / "cat_to_name.json").symlink_to((flowers / "cat_to_name.json").resolve())
    return root


def add_new_class(root, not_flowers):
    """root/<split>/103/ holding the non-flower photos (symlinks), and its name; returns the
    number of photos per split."""
    photos = list_images(not_flowers)
    splits = [split for split, share in SHARES.items() for _ in range(share)]
    counts = dict.fromkeys(SHARES, 0)
    for index, photo in enumerate(photos):
        split = splits[index % len(splits)]
        folder = root / split / NEW_CLASS
        folder.mkdir(exist_ok=True)
        name = Path(photo).relative_to(not_flowers).as_posix().replace("/", "__")
        (folder / name).symlink_to(Path(photo).resolve())
        counts[split] += 1
    names = json.loads((root / "cat_to_name.json").read_text())
    (root / "cat_to_name.json").unlink()
    (root / "cat_to_name.json").write_text(json.dumps({**names, NEW_CLASS: NEW_NAME}))
    return counts


def accuracies(save_dir):
    """(test accuracy on the old classes' photos, on the new class's or None)."""
    report = json.loads((save_dir / "test_report.json").read_text())
    old = [entry for entry in report["per_class"] if entry["name"] != NEW_NAME]
    new = [entry for entry in report["per_class"] if entry["name"] == NEW_NAME]
    old_accuracy = sum(e["correct"] for e in old) / sum(e["images"] for e in old)
    return old_accuracy, (new[0]["recall"] if new else None)


def train_once(data, save_dir, cache, flags):
    """(wall seconds, images extracted, old accuracy, new accuracy) of one train.py run."""
    args = train.get_args_parser().parse_args(
        [str(data), "--save_dir", str(save_dir), "--cache_dir", str(cache), *flags])
    started = time.perf_counter()
    result = train.main(args)
    wall = time.perf_counter() - started
    return (wall, result["extracted_images"], *accuracies(save_dir))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("flowers", type=Path, help="flowers102 with train/, valid/, test/")
    parser.add_argument("not_flowers", type=Path, help="the folder of non-flower photos")
    parser.add_argument("--flags", action="append", default=None,
                        help='train.py flags of a setting, repeatable ("" is the default; '
                        'default: "--train_stages 0" and "")')
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="work in DIR (must not exist) and keep it")
    return parser


def main(args):
    settings = args.flags if args.flags is not None else ["--train_stages 0", ""]
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.keep) if args.keep else Path(temporary)
        for number, flags in enumerate(settings):
            data = layout(args.flowers, work / f"data-{number}")
            cache = work / f"cache-{number}"
            before = train_once(data, work / f"run-{number}-102", cache, shlex.split(flags))
            added = add_new_class(data, args.not_flowers)
            after = train_once(data, work / f"run-{number}-103", cache, shlex.split(flags))
            rows.append((flags or "(default)", before, after, added))
    print("| setting | run | wall s | images through the backbone | test, 102 old classes | "
          "test, new class |")
    print("|---|---|---|---|---|---|")
    for flags, before, after, added in rows:
        for name, (wall, extracted, old, new) in (("102 classes, cold", before),
                                                   ("+ class 103, same cache", after)):
            new_text = "" if new is None else f"{new:.2%} ({added['test']} photos)"
            print(f"| `{flags}` | {name} | {wall:.1f} | {extracted} | {old:.2%} | {new_text} |")
        print(f"| `{flags}` | change | | | {(after[2] - before[2]) * 100:+.2f} points | |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
