"""Pre-labelling: predict.py photos/ checkpoint.pth --sort_into review/ puts every photo into a
folder named after its predicted class, for a person to check (and move the wrong ones).

    review/
      pink primrose/photos__0001.jpg     a symbolic link to photos/photos/0001.jpg (a hard link
      ...                                where symbolic links fail, a copy where both do)
      unknown/                           the photos the unknown verdict rejects
      manifest.jsonl                     the run's header, then one line per photo of the input

The photos are predicted by the resumable archive run (inference/bulk.py) into
review/.predictions.jsonl; only once that is complete are they linked, and manifest.jsonl is
written (atomically) from it: each photo's line is predict.py --json's (its top max(top_k, 2)
classes) with its certainty, "probability" (the top class's) and "margin" (the top class's
less the second's), and where it went, "file" (relative to review/) and "placed" (symlink,
hardlink or copy); an unreadable photo's line has its "error" and no file. The originals are
never moved or changed. An interrupted run continues with --resume: the archive predicts only
what it lacks, and linking again keeps the links already made.
"""
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from flower_classifier.inference.bulk import Archive, check_header, predict_archive
from flower_classifier.utils import distributed
from flower_classifier.utils.errors import UserError
from flower_classifier.utils.files import atomic_write

MANIFEST = "manifest.jsonl"
PREDICTIONS = ".predictions.jsonl"  # the archive's output, until the manifest is written
UNKNOWN = "unknown"


def sort_into(predictor, source, review, model, resume, batch_size, workers):
    """The whole --sort_into run of folder source into the folder review; model: bulk's
    model_identity (its top_k at least 2, for the margin). Returns a Counter of the photos per
    folder of review ("" for the unreadable ones) on rank 0, None on torchrun's other ranks."""
    source, review = Path(source), Path(review)
    problem = None
    if distributed.is_main():
        try:
            check_review_folder(source, review, resume)
        except UserError as error:
            problem = str(error)
    problem = distributed.gather_objects(problem)[0]  # every process stops, or none does
    if problem:
        raise UserError(problem)
    archive = Archive(review / PREDICTIONS, source, "folder", model)
    if (review / MANIFEST).exists():
        return finished_counts(archive, review / MANIFEST)
    if predict_archive(archive, predictor, resume, model["top_k"], batch_size,
                       workers) is None:
        return None
    counts = Counter()
    atomic_write(review / MANIFEST,
                 lambda temporary: write_manifest(archive, review, predictor, temporary, counts))
    archive.output.unlink()
    return counts


def check_review_folder(source, review, resume):
    """A UserError unless review is a folder that holds nothing yet, or (with --resume) a
    --sort_into run's, outside the input."""
    if review.exists() and not review.is_dir():
        raise UserError(f"--sort_into {review} is a file; pass a folder (it is created if "
                        "missing)")
    if review.resolve().is_relative_to(source.resolve()):
        raise UserError(f"--sort_into {review} is inside the input {source}; choose a folder "
                        "outside it, so that the links are not taken for photos")
    if not review.is_dir() or not any(review.iterdir()):
        return
    ours = [review / MANIFEST, review / PREDICTIONS, review / f"{PREDICTIONS}.parts"]
    if not resume:
        raise UserError(f"--sort_into {review} already holds files; pass --resume to continue "
                        "the run begun there, or choose an empty folder")
    if not any(path.exists() for path in ours):
        raise UserError(f"--sort_into {review} holds files but no --sort_into run to resume; "
                        "choose an empty folder")


def finished_counts(archive, manifest):
    """--resume on a finished run: its photos per folder, after checking that it is this
    run's (the same checkpoint, settings and input)."""
    counts = Counter()
    with open(manifest, encoding="utf-8") as handle:
        try:
            header = json.loads(handle.readline())
        except json.JSONDecodeError:
            header = None
        check_header(archive, header, "auto", manifest)
        for line in handle:
            counts[os.path.dirname(json.loads(line).get("file", ""))] += 1
    return counts


def write_manifest(archive, review, predictor, temporary, counts):
    """Link every photo of the archive's output into its folder and write its manifest line
    into temporary; counts gets the photos per folder."""
    unknown = UNKNOWN if UNKNOWN not in predictor.names else f"{UNKNOWN} (none of the classes)"
    with open(archive.output, encoding="utf-8") as lines, \
            open(temporary, "w", encoding="utf-8") as handle:
        handle.write(lines.readline())  # the run's header
        for index, line in enumerate(lines):
            entry = json.loads(line)
            if "error" not in entry:
                folder = unknown if entry.get("known") is False else folder_name(entry["names"][0])
                entry.update(certainty(entry["probabilities"]))
                entry["file"], entry["placed"] = place(entry["path"], archive.source,
                                                       review / folder, index)
            counts[os.path.dirname(entry.get("file", ""))] += 1
            handle.write(json.dumps(entry) + "\n")


def certainty(probabilities):
    """How sure the model is of its top class: its probability, and the margin over the
    second."""
    second = probabilities[1] if len(probabilities) > 1 else 0.0
    return {"probability": probabilities[0], "margin": probabilities[0] - second}


def folder_name(name):
    """A class's display name as a folder name: no path separators, never hidden or empty."""
    cleaned = name.replace("/", "-").replace(os.sep, "-").strip()
    return cleaned.lstrip(".") or "_"


def place(original, source, folder, index):
    """Put a link to (or a copy of) original into folder, named after its path below source
    ("a/b.jpg" becomes "a__b.jpg"; "~index" is added where another photo took that name);
    a link or copy already there for the same photo (a resumed run) is kept. Returns (its
    path relative to folder's parent, how it was placed)."""
    name = os.path.relpath(original, source).replace(os.sep, "__")
    destination = folder / name
    if os.path.lexists(destination) and not same_photo(original, destination):
        stem, suffix = os.path.splitext(name)
        destination = folder / f"{stem}~{index}{suffix}"
    if os.path.lexists(destination) and same_photo(original, destination):
        placed = how_placed(original, destination)
    else:
        placed = link_or_copy(original, destination)
    return f"{folder.name}/{destination.name}", placed


def same_photo(original, destination):
    if os.path.islink(destination):
        return os.readlink(destination) == os.path.abspath(original)
    try:
        if os.path.samefile(original, destination):
            return True
        ours, theirs = os.stat(original), os.stat(destination)
    except OSError:
        return False
    return ours.st_size == theirs.st_size and abs(ours.st_mtime - theirs.st_mtime) < 1


def how_placed(original, destination):
    if os.path.islink(destination):
        return "symlink"
    return "hardlink" if os.path.samefile(original, destination) else "copy"


def link_or_copy(original, destination):
    """A symbolic link to original at destination, else a hard link, else a copy (written
    atomically); returns which."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.abspath(original), destination)
        return "symlink"
    except OSError:
        pass
    try:
        os.link(original, destination)
        return "hardlink"
    except OSError:
        pass
    atomic_write(destination, lambda temporary: shutil.copy2(original, temporary))
    return "copy"
