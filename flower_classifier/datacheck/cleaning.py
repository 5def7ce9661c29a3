"""What --fix leaves out of a split manifest: the data check's findings, each with its reason.

    cleaned, dropped = cleaned_manifest(manifest, "photos", report)
"""
import os
from collections import Counter
from pathlib import Path

from flower_classifier.utils.console import warn


def copy_to_keep(files):
    """The one copy of an exact-duplicate group a cleaned manifest keeps: one filed in the class
    most copies agree with (on a tie between classes, the class of the first copy by path), in
    train/ where one is, then the first by path."""
    votes = Counter(entry["class"] for entry in files)
    top = max(votes.values())
    winners = {name for name, count in votes.items() if count == top}
    if len(winners) > 1:
        winners = {min((e for e in files if e["class"] in winners), key=lambda e: e["path"])[
            "class"]}
    return min((entry for entry in files if entry["class"] in winners),
               key=lambda entry: (entry["split"] != "train", entry["path"]))


def duplicate_reason(entry, keep, files):
    """Why a copy of an exact-duplicate group is left out, naming the copy kept."""
    if entry["class"] == keep["class"]:
        return f"exact duplicate of {keep['path']}, which is kept"
    agree = sum(other["class"] == keep["class"] for other in files)
    return (f"copy of {keep['path']} filed under class {entry['class']}; the copy kept is "
            f"filed under {keep['class']} ({agree} of {len(files)} copies)")


def files_to_drop(report):
    """The paths a cleaned manifest leaves out, and why: unreadable files; all but one copy of
    an exact duplicate (copy_to_keep: the copy in the class most copies agree with); the
    valid/test member of a near-duplicate pair across splits (a leak); likely mislabelled
    photos."""
    drop = {entry["path"]: "unreadable" for entry in report["unreadable"]}
    for group in report["exact_duplicates"]:
        keep = copy_to_keep(group["files"])
        drop.update({entry["path"]: duplicate_reason(entry, keep, group["files"])
                     for entry in group["files"] if entry is not keep})
    for pair in report["near_duplicates"]:
        if "across_splits" in pair["kinds"]:
            leak = max(pair["files"], key=lambda e: ("train", "valid", "test").index(e["split"]))
            drop.setdefault(leak["path"], "near-duplicate of a photo in another split")
    names = report.get("settings", {}).get("class_names") or {}  # as the sheets show them
    for entry in report["mislabelled"]:
        suggested = names.get(entry["suggested"], entry["suggested"])
        drop.setdefault(entry["path"], f"likely mislabelled (suggested {suggested})")
    return drop


def cleaned_manifest(manifest, data_dir, report):
    """The manifest (splits.split_folder's or splits.manifest_of_layout's) without the files
    files_to_drop names; returns (manifest, {path: reason})."""
    drop = files_to_drop(report)
    data_dir = Path(data_dir)
    kept = [entry for entry in manifest["files"] if os.path.join(
        data_dir / manifest["roots"][entry["split"]], entry["path"]) not in drop]
    if len(manifest["files"]) - len(kept) != len(drop):
        warn("some findings name files that are not in the manifest; they are left as they are")
    return {**manifest, "files": kept, "cleaned": {"dropped": len(drop)}}, drop
