"""Split one folder of class folders into train/valid/test, and keep the split in a manifest.

People keep photos as one folder per class, with no train/ or valid/. Each file's split is
decided by a hash of its bytes, so adding photos later never moves the ones already placed and
the same photo twice always lands in the same split (no leak of a copy into test/). The split is
written as a JSON manifest that later runs read back, and that the data check's --fix writes
cleaned.

    from flower_classifier.data.split import load_dataset
    dataset = load_dataset("photos", manifest_path="runs/x/split_manifest.json")
    dataset.class_to_idx, dataset.splits["train"].paths, dataset.manifest

A train/valid/test layout is read as it is (data.folders.find_splits), with no manifest.
"""
import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from flower_classifier.data.folders import Split, class_folders, find_splits, list_images
from flower_classifier.utils import distributed
from flower_classifier.utils.console import warn
from flower_classifier.utils.errors import UserError, error_reason
from flower_classifier.utils.files import write_json

MANIFEST_NAME = "split_manifest.json"
MANIFEST_FORMAT = 1
SPLIT_NAMES = ("train", "valid", "test")
DEFAULT_FRACTIONS = {"train": 0.8, "valid": 0.1, "test": 0.1}
FEW_PHOTOS = 10  # below this a class gets a warning: its valid/test share is a photo or two


def parse_fractions(text):
    """'0.8,0.1,0.1' -> {"train": 0.8, "valid": 0.1, "test": 0.1}; two values: no test split."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--split {text!r} is not a list of numbers; write it like 0.8,0.1,0.1 "
                        "(train, valid, test)") from None
    if len(values) not in (2, 3) or any(not 0 <= value <= 1 for value in values):
        raise UserError(f"--split {text!r} needs two or three fractions in [0, 1] (train, valid"
                        "[, test]), like 0.8,0.1,0.1")
    if abs(sum(values) - 1) > 1e-6 or values[0] == 0 or values[1] == 0:
        raise UserError(f"--split {text!r} must add up to 1 with train and valid above 0, "
                        "like 0.8,0.1,0.1")
    return {name: value for name, value in zip(SPLIT_NAMES, values) if value > 0}


def is_one_folder(data_dir):
    """True when data_dir is a folder without train/: one folder per class, to split
    automatically (split_folder names the problem when it holds no class folders)."""
    data_dir = Path(data_dir)
    return data_dir.is_dir() and not (data_dir / "train").is_dir()


def file_digest(path):
    """SHA-256 of the file's bytes (hex): the same photo under any name has the same digest."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def hash_position(digest):
    """The digest as a number in [0, 1): where the file falls among the split fractions."""
    return int(digest[:16], 16) / 2 ** 64


def split_of(position, fractions):
    """The split whose interval of [0, 1) holds position, intervals in train, valid, test order."""
    start = 0.0
    for name, fraction in fractions.items():
        if position < start + fraction:
            return name
        start += fraction
    return list(fractions)[-1]  # position within rounding of 1


def folder_files(data_dir):
    """{class name: [path relative to data_dir, ...]} of the images in each class folder."""
    data_dir = Path(data_dir)
    files = {}
    for name in class_folders(data_dir):
        images = list_images(data_dir / name)
        if images:
            files[name] = [Path(image).relative_to(data_dir).as_posix() for image in images]
    return files


def split_folder(data_dir, fractions=DEFAULT_FRACTIONS, previous=None):
    """The manifest of a hash-decided, per-class split of data_dir's class folders.

    previous: an earlier manifest of the same folder; its files keep their split (when their
    bytes are unchanged), so photos added later never move the ones already placed. A class with
    fewer distinct photos than splits is an error naming it; one with fewer than FEW_PHOTOS a
    warning. A class whose hash placed none in a split gets its photo nearest that split's
    interval (all copies of it), so every class is in every split.
    """
    data_dir = Path(data_dir)
    files = folder_files(data_dir)
    if not files:
        raise UserError(f"{data_dir} has no class folders with images; put each class's images "
                        "in a folder named after the class")
    kept = {(entry["class"], entry["path"]): entry for entry in (previous or {}).get("files", [])}
    digests_of = {name: {path: _digest_or_none(data_dir / path) for path in paths}
                  for name, paths in files.items()}
    classes_of = defaultdict(set)
    for name, digests in digests_of.items():
        for digest in digests.values():
            classes_of[digest].add(name)
    shared = {digest for digest, names in classes_of.items() if len(names) > 1}
    entries, few = [], []
    for name, paths in files.items():
        digests = digests_of[name]
        placed = {path: _placed_split(kept.get((name, path)), digest, fractions)
                  for path, digest in digests.items()}
        distinct = {digest or path for path, digest in digests.items()}
        if len(distinct) < len(fractions):
            raise UserError(f"class {name!r} has {len(distinct)} distinct photo(s); a split into "
                            f"{', '.join(fractions)} needs at least {len(fractions)}: add photos "
                            "to it or remove its folder")
        if len(distinct) < FEW_PHOTOS:
            few.append(name)
        _fill_empty_splits(placed, digests, fractions, shared)
        entries += [{"path": path, "class": name, "split": placed[path], "sha256": digests[path]}
                    for path in paths]
    if few:
        warn(f"{len(few)} class(es) have fewer than {FEW_PHOTOS} photos ({', '.join(few[:5])}"
             f"{' ...' if len(few) > 5 else ''}); their valid/test results rest on a photo or two")
    return {"format": MANIFEST_FORMAT, "fractions": dict(fractions),
            "roots": {name: "." for name in fractions}, "classes": list(files),
            "files": entries}


def _digest_or_none(path):
    """The file's digest, None where it cannot be read (the data check reports it)."""
    try:
        return file_digest(path)
    except OSError:
        return None


def _placed_split(earlier, digest, fractions):
    """The earlier manifest's split where the file is unchanged, else the split its hash names."""
    if earlier and earlier.get("sha256") == digest and earlier["split"] in fractions:
        return earlier["split"]
    position = hash_position(digest) if digest else 0.0  # unreadable: train, where it is skipped
    return split_of(position, fractions)


def _fill_empty_splits(placed, digests, fractions, shared):
    """Give each split with no photo of this class the photo (all its copies) nearest its
    interval, taken from the split that has the most; a photo also filed under another class
    (shared digests) is taken last, so that its copies stay in one split."""
    start = 0.0
    for name, fraction in fractions.items():
        middle = start + fraction / 2
        start += fraction
        if name in placed.values():
            continue
        counts = {split: list(placed.values()).count(split) for split in fractions}
        donor = max(counts, key=counts.get)
        candidates = [path for path in placed if placed[path] == donor and digests[path]]
        nearest = min(candidates, key=lambda path: (digests[path] in shared,
                                                    abs(hash_position(digests[path]) - middle)))
        for path in placed:
            if digests[path] == digests[nearest]:
                placed[path] = name


@dataclass
class Dataset:
    """The classes and splits of a data folder, and the manifest of its automatic split (None
    for a train/valid/test layout)."""
    class_to_idx: dict
    splits: dict
    manifest: dict | None = None


def load_dataset(data_dir, fractions=DEFAULT_FRACTIONS, split_from=None, manifest_path=None):
    """The Dataset of data_dir: the split the manifest file split_from records; a one-folder
    data_dir split by content hash; or a train/valid/test layout as it is.

    manifest_path: where the automatic split is kept: an earlier manifest there keeps its
    photos where they were (unless split_from is given), and the split is written there (by
    torchrun's rank 0)."""
    manifest_path = Path(manifest_path) if manifest_path else None
    if split_from:
        manifest = read_manifest(split_from)
    elif is_one_folder(data_dir):
        previous = (read_manifest(manifest_path) if manifest_path and manifest_path.is_file()
                    else None)
        manifest = split_folder(data_dir, fractions, previous)
    else:
        return Dataset(*find_splits(data_dir))
    dataset = Dataset(*manifest_splits(manifest, data_dir), manifest)
    if manifest_path and distributed.is_main():
        write_manifest(manifest, manifest_path)
    return dataset


def manifest_record(manifest):
    """What the checkpoint records of an automatic split: its fractions and a digest of its
    file list (the manifest itself stays in the save folder)."""
    listing = sorted((entry["split"], entry["class"], entry["path"]) for entry in manifest["files"])
    digest = hashlib.sha256(repr(listing).encode()).hexdigest()
    return {"manifest": MANIFEST_NAME, "fractions": manifest["fractions"], "files_sha256": digest,
            "counts": {name: sum(1 for entry in manifest["files"] if entry["split"] == name)
                       for name in manifest["roots"]}}


def manifest_of_layout(data_dir):
    """A manifest of an existing train/valid/test layout, as found by find_splits (for --fix)."""
    data_dir = Path(data_dir)
    class_to_idx, splits = find_splits(data_dir)
    classes = list(class_to_idx)
    entries = [{"path": Path(path).relative_to(split.root).as_posix(), "class": classes[label],
                "split": name, "sha256": _digest_or_none(path)}
               for name, split in splits.items() for path, label in zip(split.paths, split.labels)]
    return {"format": MANIFEST_FORMAT, "fractions": None,
            "roots": {name: name for name in splits}, "classes": classes, "files": entries}


def write_manifest(manifest, path):
    """The manifest as JSON, written atomically."""
    write_json(manifest, path)


def read_manifest(path):
    """A manifest written by write_manifest, checked enough to give a clear error."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"cannot read split manifest {path} ({error_reason(error)}); pass the "
                        f"{MANIFEST_NAME} a run wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"split manifest {path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not all(
            key in manifest for key in ("roots", "classes", "files")):
        raise UserError(f"{path} is not a split manifest (format {MANIFEST_FORMAT}); pass the "
                        f"{MANIFEST_NAME} a run wrote")
    return manifest


def manifest_splits(manifest, data_dir):
    """(class_to_idx, {"train": Split, "valid": Split[, "test": Split]}) of the manifest's files
    below data_dir, ordered as data.folders.find_splits orders them. A listed file that is gone is
    an error: the split would silently change."""
    data_dir = Path(data_dir)
    classes = sorted(manifest["classes"])  # as class_folders sorts them
    class_to_idx = {name: index for index, name in enumerate(classes)}
    by_split = {name: [] for name in manifest["roots"]}
    for entry in manifest["files"]:
        by_split[entry["split"]].append((class_to_idx[entry["class"]], entry["path"]))
    splits = {}
    for name in SPLIT_NAMES:
        if not by_split.get(name):
            continue
        root = data_dir / manifest["roots"][name]
        rows = sorted(by_split[name])
        splits[name] = Split(root, [os.path.join(root, path) for _, path in rows],
                             [label for label, _ in rows])
    for required in ("train", "valid"):
        if required not in splits:
            raise UserError(f"the split manifest puts no photo in {required}/; split again")
    missing = [path for split in splits.values() for path in split.paths
               if not os.path.lexists(path)]
    if missing:
        raise UserError(f"{len(missing)} file(s) of the split manifest are missing from {data_dir} "
                        f"({', '.join(missing[:3])}); pass the folder the manifest was made of, "
                        "or split again without --split_from")
    return class_to_idx, splits
