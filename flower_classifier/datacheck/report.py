"""The whole data check: its report (data_report.json), contact sheets and summary, kept
while the files, features and settings stay the same.

    report = check_dataset(class_to_idx, splits, features, save_dir, cache_dir)
    print("\\n".join(summary_lines(report, save_dir)))
"""
import contextlib
import hashlib
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from flower_classifier.datacheck.facts import catalogue
from flower_classifier.datacheck.findings import (
    EDGE_THRESHOLD,
    FOLDS,
    NEAR_THRESHOLD,
    exact_duplicates,
    feature_space,
    likely_mislabelled,
    near_duplicates,
    where,
)
from flower_classifier.models.features import file_stamps
from flower_classifier.reports.contact_sheets import contact_sheet, short_path
from flower_classifier.utils.files import write_json

REPORT_NAME = "data_report.json"
SHEETS_FOLDER = "data_check"
TINY_SIDE = 64         # shorter side in pixels below which an image is reported as tiny
SHEET_LIMIT = 60       # thumbnails per contact sheet, worst first
RULES_VERSION = 1      # in the report's fingerprint: bump it when what the check finds changes
SHEET_LEGENDS = {      # under each contact sheet's title: what its captions' numbers mean
    "exact_duplicates": "#n: the group (its copies follow each other), then the split each "
                        "copy is in",
    "near_duplicates": "#n: the pair; r: the correlation of the two small greyscale thumbnails "
                       "(1.000 = the same picture), then the split",
    "mislabelled": "filed: the class folder it is in (the probability the check gives that "
                   "class); suggested: the class it looks like (its probability)",
    "tiny": "width x height in pixels",
    "unreadable": "files that cannot be decoded as images",
}


def class_counts(rows, classes):
    """{class: {split: images, ..., "total": images}} and the largest-to-smallest total ratio."""
    counts = {name: defaultdict(int) for name in classes}
    for row in rows:
        counts[row["class"]][row["split"]] += 1
        counts[row["class"]]["total"] += 1
    totals = [count["total"] for count in counts.values()]
    ratio = max(totals) / min(totals) if min(totals) else math.inf
    return {name: dict(count) for name, count in counts.items()}, ratio


def check_dataset(class_to_idx, splits, features, save_dir=None, cache_dir=None,
                  near_threshold=NEAR_THRESHOLD, tiny_side=TINY_SIDE, folds=FOLDS, seed=0,
                  class_names=None, views=None):
    """The data check of splits ({name: data.folders.Split}) with features ({name: (features, ok)},
    as split_features returns). cache_dir: the feature cache's folder, where the thumbnails are
    kept too (None: computed each time). With save_dir, data_report.json and the contact sheets
    are written there; a report already there from the same files, features and settings is
    returned as it is (a rerun on unchanged data checks nothing again). class_names: {folder
    name: display name} for the contact sheets' captions (in the fingerprint: sheets drawn with
    other names are drawn again). views: the photos it decodes also become views for people
    there (facts.file_facts). Returns the report (a JSON-ready dict)."""
    started = time.perf_counter()
    settings = {"near_threshold": near_threshold, "edge_threshold": EDGE_THRESHOLD,
                "tiny_side": tiny_side, "folds": folds, "seed": seed,
                "mislabel_rule": "confident learning on out-of-fold predictions of a ridge "
                "classifier on the features"}
    fingerprint = report_fingerprint(class_to_idx, splits, features, {
        **settings, **({"class_names": class_names} if class_names else {})})
    if save_dir is not None and (kept := kept_report(save_dir, fingerprint)):
        return {**kept, "kept": True}
    classes = list(class_to_idx)
    rows, matrix, pixels = catalogue(class_to_idx, splits, features, cache_dir, views)
    usable = torch.tensor([row["ok"] for row in rows], dtype=torch.bool)
    space = feature_space(matrix, usable)
    del matrix  # a quarter of a gigabyte at 50,000 images, not needed past feature_space
    counts, ratio = class_counts(rows, classes)
    report = {
        "images": len(rows), "classes": len(classes), "class_counts": counts,
        "imbalance_ratio": ratio if math.isfinite(ratio) else None,
        "exact_duplicates": exact_duplicates(rows),
        "near_duplicates": near_duplicates(rows, space, pixels, near_threshold),
        "unreadable": [where(row) for row in rows if not row["ok"]],
        "tiny": [{**where(row), "width": row["size"][0], "height": row["size"][1]}
                 for row in rows if row["size"] and min(row["size"]) < tiny_side],
        "mislabelled": likely_mislabelled(rows, space, classes, folds, seed),
        "settings": settings, "fingerprint": fingerprint,
    }
    report["seconds"] = round(time.perf_counter() - started, 2)
    if save_dir is not None:
        save_report(report, save_dir, class_names)
    return report


def report_fingerprint(class_to_idx, splits, features, settings):
    """A digest of what the report is computed from: the classes, each split's files (path,
    label, size and times) and their features, the settings and RULES_VERSION."""
    described = [RULES_VERSION, class_to_idx, settings,
                 {name: [[str(path) for path in split.paths], list(split.labels),
                         file_stamps(split.paths)] for name, split in splits.items()}]
    digest = hashlib.sha256(json.dumps(described).encode())
    for name in splits:
        for tensor in features[name]:
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def kept_report(save_dir, fingerprint):
    """The report in save_dir if it has this fingerprint and its contact sheets are there
    (save_report removes the report before it writes the sheets: they are that report's)."""
    try:
        report = json.loads((Path(save_dir) / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("fingerprint") != fingerprint:
        return None
    sheets = report.get("sheets")
    sheets_there = isinstance(sheets, dict) and all(
        (Path(save_dir) / SHEETS_FOLDER / f"{finding}.png").is_file() for finding in sheets)
    return report if sheets_there else None


def save_report(report, save_dir, class_names=None):
    """data_report.json and one contact sheet per non-empty finding in save_dir/data_check/;
    class_names ({folder name: display name}) names the classes on the sheets."""
    save_dir = Path(save_dir)
    with contextlib.suppress(OSError):  # an earlier report never meets new sheets (unwritable:
        (save_dir / REPORT_NAME).unlink(missing_ok=True)  # write_json below says so)
    report["sheets"] = {}
    for finding, items in sheet_items(report, class_names).items():
        if items:
            path = save_dir / SHEETS_FOLDER / f"{finding}.png"
            contact_sheet(items[:SHEET_LIMIT], path,
                          f"{finding.replace('_', ' ')}: {len(report[finding])} found"
                          + (f"; the first {SHEET_LIMIT} of their {len(items)} images shown"
                             if len(items) > SHEET_LIMIT else ""),
                          legend=SHEET_LEGENDS[finding])
            report["sheets"][finding] = str(path)
    write_json(report, save_dir / REPORT_NAME)


def sheet_items(report, class_names=None):
    """{finding: [(image path, caption lines)]}: the images a person should look at, worst first;
    members of a group follow each other, numbered by group. Classes show their display names
    where class_names ({folder name: display name}) has one."""
    name = (class_names or {}).get
    items = {"exact_duplicates": [], "near_duplicates": []}
    for finding in items:
        for number, group in enumerate(report[finding], 1):
            score = (f" r {group['pixel_correlation']:.3f}" if "pixel_correlation" in group
                     else "")
            items[finding] += [(entry["path"], [f"#{number}{score} {entry['split']}",
                                                short_path(entry["path"])])
                               for entry in group["files"]]
    items["mislabelled"] = [
        (entry["path"], [f"filed: {name(entry['class'], entry['class'])} "
                         f"({entry['self_confidence']:.2f})",
                         f"suggested: {name(entry['suggested'], entry['suggested'])} "
                         f"({entry['suggested_probability']:.2f})",
                         short_path(entry["path"])])
        for entry in report["mislabelled"]]
    items["tiny"] = [(entry["path"], [f"{entry['width']}x{entry['height']} px",
                                      short_path(entry["path"])]) for entry in report["tiny"]]
    items["unreadable"] = [(entry["path"], ["unreadable", short_path(entry["path"])])
                           for entry in report["unreadable"]]
    return items


def summary_lines(report, save_dir=None):
    """The short block printed before training: counts of each finding and where the rest is."""
    counts = [count["total"] for count in report["class_counts"].values()]
    exact = report["exact_duplicates"]
    near = report["near_duplicates"]
    ratio = report["imbalance_ratio"]
    lines = [f"data check: {report['images']} images, {report['classes']} classes "
             f"({min(counts)} to {max(counts)} per class"
             + (f", imbalance {ratio:.1f}x)" if ratio else ", a class is empty)"),
             f"  exact duplicates: {len(exact)} groups ({_kind_counts(exact)})",
             f"  near-duplicates: {len(near)} pairs ({_kind_counts(near)})",
             f"  likely mislabelled: {len(report['mislabelled'])}; unreadable: "
             f"{len(report['unreadable'])}; tiny (< {report['settings']['tiny_side']} px): "
             f"{len(report['tiny'])}"]
    if save_dir is not None:
        lines.append(f"  full report and contact sheets: {Path(save_dir) / REPORT_NAME}, "
                     f"{Path(save_dir) / SHEETS_FOLDER}/"
                     + ("; kept from the last check of the same files (delete it to check again)"
                        if report.get("kept") else ""))
    return lines


def _kind_counts(groups):
    counts = defaultdict(int)
    for group in groups:
        for kind in group["kinds"]:
            counts[kind] += 1
    return ", ".join(f"{counts[kind]} {kind.replace('_', ' ')}" for kind in
                     ("within_class", "across_classes", "across_splits")) if groups else "none"
