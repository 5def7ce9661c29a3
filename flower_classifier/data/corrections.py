"""Decisions about single photos, kept in corrections.json: the contract between the studio (which
writes them) and train.py and check_data.py (which apply them with --corrections).

    {"format": 1, "decisions": {"/abs/resolved/photo.jpg": {"label": "3", "at": "2026-..."}}}

A label of null drops the photo from training; a class folder name says the photo is of that
class (relabelled where it is filed under another, kept where it is filed there). A decision
with a "split" adds a photo from outside the folder (a new photo labelled in the studio) to that
split with its label; with a label of null it is left out. Photos are
keyed by their absolute resolved path (symlinks followed), so the same file is the same photo
whichever folder of links reaches it. The photos themselves are never moved nor changed.

    from flower_classifier.data.corrections import load_corrections, record_decisions
    record_decisions("studio/corrections.json", {"/data/1/a.jpg": None})   # written at once
    dataset = apply_corrections(load_dataset("photos"), load_corrections("corrections.json"))
"""
import contextlib
import datetime
import json
import os
import threading
from dataclasses import replace
from pathlib import Path

from flower_classifier.data.folders import Split
from flower_classifier.data.images import is_image_file
from flower_classifier.utils.errors import UserError, error_reason
from flower_classifier.utils.files import write_json

CORRECTIONS_NAME = "corrections.json"
CORRECTIONS_FORMAT = 1
FORGET = object()  # record_decisions: remove the photo's decision (back to as filed)
MAX_HOPS = 8  # links followed by photo_keys before photo_key takes over
_LOCK = threading.Lock()  # one writer at a time in this process; flock across processes

try:
    import fcntl
except ImportError:  # not on Windows: threads are still serialised by _LOCK
    fcntl = None


def photo_key(path):
    """The key of a photo in corrections.json: its absolute path, symlinks resolved."""
    return str(Path(path).resolve())


def photo_keys(paths):
    """photo_key() of each path (its absolute path, symlinks resolved) with far fewer system
    calls, so a large folder opens quickly: each folder is resolved once, and only a photo
    that is itself a link is followed, from its resolved folder. A name like "..", or a chain
    of links longer than MAX_HOPS, is left to photo_key."""
    folders = {}

    def key(path, hops=0):
        folder, name = os.path.split(path)
        if name in ("", ".", "..") or hops > MAX_HOPS:
            return photo_key(path)
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        joined = os.path.join(folders[folder], name)
        if not os.path.islink(joined):
            return joined
        try:
            target = os.readlink(joined)
        except OSError:
            return photo_key(path)
        return key(os.path.join(folders[folder], target), hops + 1)

    return [key(str(path)) for path in paths]


def load_corrections(path):
    """{photo key: {"label": class or None, "at": ISO time}} of corrections.json; a missing file
    is no decision, a damaged one a UserError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise UserError(f"cannot read corrections file {path} ({error_reason(error)}); check its "
                        "permissions") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"corrections file {path} is not valid JSON ({error}); restore it or "
                        "delete it to start again") from None
    decisions = data.get("decisions") if isinstance(data, dict) else None
    if (data.get("format") if isinstance(data, dict) else None) != CORRECTIONS_FORMAT or not (
            isinstance(decisions, dict) and all(_valid(entry) for entry in decisions.values())):
        raise UserError(f"{path} is not a corrections file (format {CORRECTIONS_FORMAT}: "
                        '{"format": 1, "decisions": {PHOTO: {"label": CLASS or null, "at": '
                        'TIME}}}); pass the corrections.json the studio wrote')
    return decisions


def _valid(entry):
    return (isinstance(entry, dict) and "label" in entry
            and (entry["label"] is None or isinstance(entry["label"], str))
            and isinstance(entry.get("split", ""), str))


@contextlib.contextmanager
def _exclusive(path):
    """This process's lock, and an advisory lock on path's .lock file against other processes."""
    with _LOCK:
        if fcntl is None:
            yield
            return
        lock_path = Path(path).with_name(f".{Path(path).name}.lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a")
        except OSError as error:
            raise UserError(f"cannot write {lock_path} ({error_reason(error)}); choose a folder "
                            "you can write to") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_decisions(path, changes, at=None, added_to=None):
    """Merge changes ({photo path: class name, None to drop, or FORGET}) into the corrections
    file and rewrite it atomically at once. The file is read again under the lock, so two
    tabs or processes deciding about different photos both keep their decisions. added_to:
    {photo path: split} of the photos from outside the folder that their label adds to that
    split. Returns all decisions as written."""
    at, added_to = at or now_iso(), added_to or {}
    with _exclusive(path):
        decisions = load_corrections(path)
        for photo, label in changes.items():
            key = photo_key(photo)
            if label is FORGET:
                decisions.pop(key, None)
            else:
                decisions[key] = {"label": label, "at": at}
                if photo in added_to:
                    decisions[key]["split"] = added_to[photo]
        write_json({"format": CORRECTIONS_FORMAT, "decisions": decisions}, path)
    return decisions


def corrected_split(split, class_to_idx, decisions, counts, matched):
    """The split with dropped photos left out and relabelled photos' labels changed."""
    paths, labels = [], []
    for path, label, key in zip(split.paths, split.labels, photo_keys(split.paths)):
        decision = decisions.get(key)
        if decision is not None:
            matched.add(key)
        if decision is None:
            paths.append(path)
            labels.append(label)
            continue
        if decision["label"] is None:
            counts["dropped"] += 1
            continue
        new = class_to_idx[decision["label"]]
        counts["relabelled" if new != label else "kept"] += 1
        paths.append(path)
        labels.append(new)
    return Split(split.root, paths, labels)


def apply_corrections(dataset, decisions, counts=None):
    """A new data.split.Dataset with the decisions applied in the split each photo is in
    (dropped photos removed, relabelled ones with their new label); the split manifest is the
    same, so every photo keeps its placement. A label naming no class of the dataset is a
    UserError. Decisions with a split add photos from elsewhere to that split (a label) or
    leave them out (null). counts: a dict given is filled with dropped, relabelled, kept,
    added and unmatched."""
    class_to_idx = dataset.class_to_idx
    unknown = sorted({entry["label"] for entry in decisions.values()
                      if entry["label"] is not None and entry["label"] not in class_to_idx})
    if unknown:
        raise UserError(f"the corrections name class(es) the data folder lacks: "
                        f"{', '.join(map(repr, unknown[:5]))}; pass the corrections made on "
                        "this folder")
    counts = {} if counts is None else counts
    counts.update(dropped=0, relabelled=0, kept=0, added=0)
    matched = set()
    splits = {name: corrected_split(split, class_to_idx, decisions, counts, matched)
              for name, split in dataset.splits.items()}
    for key, entry in decisions.items():  # new photos: added with their label, or left out
        if key in matched or entry.get("split") not in splits:
            continue
        if entry["label"] is None:
            matched.add(key)
        elif is_image_file(key) and os.path.isfile(key):
            matched.add(key)
            splits[entry["split"]].paths.append(key)
            splits[entry["split"]].labels.append(class_to_idx[entry["label"]])
            counts["added"] += 1
    counts["unmatched"] = len(set(decisions) - matched)
    for required in ("train", "valid"):
        if required in splits and not splits[required].paths:
            raise UserError(f"the corrections drop every photo of {required}/; keep some")
    return replace(dataset, splits=splits)


def corrections_line(path, counts):
    """One log line of what the corrections changed."""
    unmatched = (f"; {counts['unmatched']} decision(s) name photos not in the data folder"
                 if counts["unmatched"] else "")
    added = f", {counts['added']} added" if counts["added"] else ""
    return (f"corrections {os.fspath(path)}: {counts['dropped']} photo(s) dropped, "
            f"{counts['relabelled']} relabelled, {counts['kept']} confirmed{added}{unmatched}")
