"""What --fix leaves out of a split manifest: the data check's findings, each with its reason.

    cleaned, dropped = cleaned_manifest(manifest, "photos", report)
"""
import os
from pathlib import Path

from flower_classifier.utils.console import warn


def files_to_drop(report):
    """The paths a cleaned manifest leaves out, and why: unreadable files; all but one copy of
    a photo filed twice in one class; every copy of a photo filed under different classes (its
    class is in doubt); the valid/test member of a near-duplicate pair across splits (a leak);
    likely mislabelled photos."""
    drop = {entry["path"]: "unreadable" for entry in report["unreadable"]}
    for group in report["exact_duplicates"]:
        if "across_classes" in group["kinds"]:
            drop.update({entry["path"]: "filed under several classes" for entry in group["files"]})
            continue
        keep = min(group["files"], key=lambda e: (e["split"] != "train", e["path"]))
        drop.update({entry["path"]: "exact duplicate" for entry in group["files"]
                     if entry is not keep})
    for pair in report["near_duplicates"]:
        if "across_splits" in pair["kinds"]:
            leak = max(pair["files"], key=lambda e: ("train", "valid", "test").index(e["split"]))
            drop.setdefault(leak["path"], "near-duplicate of a photo in another split")
    for entry in report["mislabelled"]:
        drop.setdefault(entry["path"], f"likely mislabelled (suggested {entry['suggested']})")
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
