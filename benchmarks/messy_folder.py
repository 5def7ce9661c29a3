"""How well the data check finds what a messy photo folder holds: precision and recall.

    python benchmarks/messy_folder.py ../shared/data/flowers102 --out /tmp/messy
    python benchmarks/messy_folder.py ../shared/data/flowers102 --out /tmp/messy2 --seed 1

Builds, outside the project, one folder per class from the flowers' train/, valid/ and test/
(symlinks to the untouched photos), then makes it messy and keeps a list of what it did
(truth.json): --copies exact copies (a third of them filed under another class), --near_copies
near-copies (resized, re-encoded at another JPEG quality, slightly cropped: one to three of
these; real files in the same class), and --moved_share of the photos moved into a wrong class.
Then it runs the data check as check_data.py does (automatic split, features through the cache,
then the check): cold, then twice warm, and prints recall and precision of each finding against
the list. Pairs the check finds among the untouched photos are counted apart: the flowers hold
duplicates and burst shots of their own, which no list names (look at them in the contact sheet).

Then it times the check on the flowers' own train/valid/test layout: on a warm cache the
check itself is what it adds to a training run (the features are there already); check_data.py's
wall time also holds building the backbone and its engine, which training does anyway.

The near-duplicate thresholds were chosen with --seed 0; report the goal figures with another.
"""
import argparse
import random
import shutil
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from PIL import Image  # noqa: E402

from flower_classifier.cli.options import HelpFormatter, positive_int
from flower_classifier.cli.runner import run_cli
from flower_classifier.data.folders import list_images
from flower_classifier.utils.files import write_json


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("flowers", help="the flowers' folder with train/, valid/, test/")
    parser.add_argument("--out", required=True, help="an empty or missing folder outside the "
                        "project for the messy folder, its truth list and the check's report")
    parser.add_argument("--seed", type=int, default=0, help="what is copied and moved")
    parser.add_argument("--copies", type=positive_int, default=100, help="exact copies")
    parser.add_argument("--near_copies", type=positive_int, default=100, help="near-copies")
    parser.add_argument("--moved_share", type=float, default=0.02,
                        help="share of the photos moved into a wrong class")
    parser.add_argument("--cache_dir", default=None, help="feature cache (default: the one "
                        "train.py uses)")
    parser.add_argument("--near_threshold", type=float, default=None,
                        help="thumbnail correlation of near-duplicates (default: the check's)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes")
    return parser


def merged_folder(flowers, folder):
    """{relative path: original file} of one folder per class made of train/, valid/, test/."""
    originals = {}
    for split in ("train", "valid", "test"):
        for path in list_images(Path(flowers) / split):
            path = Path(path)
            relative = f"{path.parent.name}/{path.name}"
            originals[relative] = path.resolve()
    for relative, original in originals.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).symlink_to(original)
    return originals


def near_copy(original, destination, generator):
    """A resized, re-encoded or slightly cropped copy (one to three of them, at random)."""
    with Image.open(original) as image:
        image = image.convert("RGB")
    changes = generator.sample(["resize", "quality", "crop"], generator.randint(1, 3))
    if "crop" in changes:
        width, height = image.size
        margin = generator.uniform(0.02, 0.06)
        left = int(width * generator.uniform(0, margin))
        top = int(height * generator.uniform(0, margin))
        image = image.crop((left, top, left + int(width * (1 - margin)),
                            top + int(height * (1 - margin))))
    if "resize" in changes:
        scale = generator.uniform(0.5, 0.9)
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                             Image.Resampling.BICUBIC)
    quality = generator.randint(55, 85) if "quality" in changes else 95
    image.save(destination, "JPEG", quality=quality)
    return changes


def make_messy(flowers, folder, seed, copies, near_copies, moved_share):
    """Build the messy folder; returns the truth list (paths relative to folder)."""
    generator = random.Random(seed)
    originals = merged_folder(flowers, folder)
    classes = sorted({relative.split("/")[0] for relative in originals})
    chosen = generator.sample(sorted(originals), copies + near_copies)
    truth = {"exact_copies": [], "near_copies": [], "moved": []}
    for index, relative in enumerate(chosen[:copies]):
        name, file = relative.split("/")
        into = generator.choice([c for c in classes if c != name]) if index % 3 == 0 else name
        copy = f"{into}/copy_{index}_{file}"
        shutil.copyfile(originals[relative], folder / copy)
        truth["exact_copies"].append({"copy": copy, "original": relative})
    for index, relative in enumerate(chosen[copies:]):
        name, file = relative.split("/")
        copy = f"{name}/near_{index}_{Path(file).stem}.jpg"
        changes = near_copy(originals[relative], folder / copy, generator)
        truth["near_copies"].append({"copy": copy, "original": relative, "changes": changes})
    untouched = sorted(set(originals) - set(chosen))
    for relative in generator.sample(untouched, round(moved_share * len(originals))):
        name, file = relative.split("/")
        into = generator.choice([c for c in classes if c != name])
        (folder / relative).rename(folder / into / file)
        truth["moved"].append({"path": f"{into}/{file}", "true_class": name})
    return truth


def source_of(truth):
    """{relative path of a planted copy: relative path of its original}."""
    return {entry["copy"]: entry["original"]
            for kind in ("exact_copies", "near_copies") for entry in truth[kind]}


def pair_scores(found, planted, source, folder):
    """(recall of the planted copies, precision over the found pairs that involve a planted
    copy, the pairs found among the untouched photos). A copy counts as found when the check
    pairs it with its original or another copy of it; a found pair is right when both files are
    (copies of) one original, or of two originals that the check pairs itself (the shared
    data's own duplicates, listed apart)."""
    relative = [[str(Path(entry["path"]).relative_to(folder)) for entry in group["files"]]
                for group in found]
    pairs = [(a, b) for files in relative for i, a in enumerate(files) for b in files[i + 1:]]

    def root(path):
        return source.get(path, path)

    among_originals = {frozenset(pair) for pair in pairs
                       if pair[0] not in source and pair[1] not in source}
    recalled = sum(any(copy in pair and root(pair[0]) == root(pair[1]) for pair in pairs)
                   for copy, _ in planted)
    involving = [pair for pair in pairs if pair[0] in source or pair[1] in source]
    right = [(a, b) for a, b in involving
             if root(a) == root(b) or frozenset((root(a), root(b))) in among_originals]
    return (recalled / len(planted), len(right) / len(involving) if involving else 1.0,
            sorted(tuple(sorted(pair)) for pair in among_originals))


def mislabel_scores(suspects, moved, folder):
    """(share of the moved photos among the 2N most suspicious, N = photos moved; precision and
    recall of the whole suspect list)."""
    listed = [str(Path(entry["path"]).relative_to(folder)) for entry in suspects]
    moved = {entry["path"] for entry in moved}
    top = listed[:2 * len(moved)]
    hits = sum(path in moved for path in listed)
    return (sum(path in moved for path in top) / len(moved),
            hits / len(listed) if listed else 1.0, hits / len(moved))


def check_args(folder, save_dir, args):
    """check_data.py's arguments for the messy folder (its defaults otherwise)."""
    from flower_classifier.cli import check_data

    extra = ["--cache_dir", args.cache_dir] if args.cache_dir else []
    extra += ["--near_threshold", str(args.near_threshold)] if args.near_threshold else []
    extra += ["--workers", str(args.workers)] if args.workers is not None else []
    return check_data.get_args_parser().parse_args([str(folder), "--save_dir", str(save_dir),
                                                    *extra])


def timed_check(check_args_):
    """(report, wall seconds of the whole check_data run: split, features, check; wall and CPU
    seconds of the check itself, what it adds to a training run that has the features)."""
    from flower_classifier.cli import check_data
    from flower_classifier.datacheck import report

    check_dataset = report.check_dataset
    spent = {}

    def timed(*args, **kwargs):
        started = time.process_time()
        report = check_dataset(*args, **kwargs)
        spent["cpu"] = time.process_time() - started
        return report

    report.check_dataset = timed  # run_check imports it when it runs
    try:
        started = time.perf_counter()
        report, _ = check_data.run_check(check_args_)
        return report, time.perf_counter() - started, report["seconds"], spent["cpu"]
    finally:
        report.check_dataset = check_dataset


def print_timing(name, report, seconds, check_seconds, check_cpu):
    print(f"{name}: check_data.py took {seconds:.1f} s, the check itself {check_seconds:.1f} s "
          f"wall, {check_cpu:.1f} s CPU (both cores together), on {report['images']} images")


def print_scores(report, truth, folder):
    source = source_of(truth)
    for kind, finding in (("exact_copies", "exact_duplicates"), ("near_copies", "near_duplicates")):
        planted = [(entry["copy"], entry["original"]) for entry in truth[kind]]
        recall, precision, among = pair_scores(report[finding], planted, source, folder)
        print(f"{finding}: recall {100 * recall:.1f}% of {len(planted)} planted, precision "
              f"{100 * precision:.1f}% over the found pairs involving a planted copy; "
              f"{len(among)} more pairs among the untouched shared photos (their own)")
    top, precision, recall = mislabel_scores(report["mislabelled"], truth["moved"], folder)
    print(f"mislabelled: {100 * top:.1f}% of the {len(truth['moved'])} moved photos are among the "
          f"{2 * len(truth['moved'])} most suspicious; the whole list of "
          f"{len(report['mislabelled'])}: precision {100 * precision:.1f}%, recall "
          f"{100 * recall:.1f}%")


def main(args):
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: {out} is not empty; pass a new folder")
    folder = out / "photos"
    started = time.perf_counter()
    truth = make_messy(args.flowers, folder, args.seed, args.copies, args.near_copies,
                       args.moved_share)
    write_json(truth, out / "truth.json")
    print(f"built {folder}: {len(list_images(folder))} photos, {len(truth['exact_copies'])} exact "
          f"copies, {len(truth['near_copies'])} near-copies, {len(truth['moved'])} moved "
          f"({time.perf_counter() - started:.1f} s)")
    # Each run its own --save_dir: in one folder a rerun would keep the earlier run's report.
    for run in ("cold", "warm", "warm again"):
        report, *seconds = timed_check(check_args(folder, out / f"check {run}", args))
        print_timing(f"messy folder, {run} cache", report, *seconds)
    print_scores(report, truth, folder)
    for run in ("first", "warm"):
        print_timing(f"the flowers' own layout, {run} run",
                     *timed_check(check_args(args.flowers, out / f"flowers_check {run}", args)))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
