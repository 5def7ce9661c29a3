"""The data check: what in a photo folder would mislead training or inflate the test score.

Exact duplicates (same bytes) within a class, across classes and across splits (leaks);
near-duplicates by cosine similarity of the backbone features training computes anyway (so on a
warm feature cache the check costs no backbone pass); unreadable and tiny images; class counts
and the imbalance ratio; and photos that are likely filed under the wrong class, found by the
confident-learning rule on out-of-fold predictions of a linear classifier on the same features.
It never moves or deletes a file: it writes data_report.json and one contact sheet per finding,
and cleaned_manifest() turns the findings into a split manifest without them.

    features = split_features(extractor, splits, eval_transform(backbone.preprocess))
    report = check_dataset(class_to_idx, splits, features, save_dir)
    print("\\n".join(summary_lines(report)))
"""
import hashlib
import io
import math
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from common import atomic_write, warn, write_json
from data_utils import UNREADABLE_IMAGE_ERRORS, load_image

REPORT_NAME = "data_report.json"
SHEETS_FOLDER = "data_check"
MIRROR_CHOICES = ("predict", "all", "off")  # train.py's --mirror
NEAR_THRESHOLD = 0.93  # cosine similarity; chosen on a messy folder of seed 1 (see benchmarks)
TINY_SIDE = 64         # shorter side in pixels below which an image is reported as tiny
FOLDS = 5
SHEET_LIMIT = 60       # thumbnails per contact sheet, worst first
FIT_EPOCHS = 30        # full-batch steps of the out-of-fold classifier


def mirrored(mirror, split_name):
    """Whether train.py averages this split's features with the mirror image's (its --mirror)."""
    return mirror == "all" or (mirror == "predict" and split_name != "train")


def split_features(extractor, splits, transform, mirror="predict"):
    """{split: (float16 features [N, D], ok [N])}, one extractor call per (folder, mirror) pair.

    Splits sharing a folder (an automatically split one) are extracted in one call, so they
    share one cache file instead of each overwriting the other's; a train/valid/test layout
    gets exactly the per-split calls train.py makes, so a warm training run's cache is reused.
    """
    groups = defaultdict(list)
    for name, split in splits.items():
        groups[(str(Path(split.root).resolve()), mirrored(mirror, name))].append(name)
    features = {}
    for (_, mirror_on), names in groups.items():
        paths = [path for name in names for path in splits[name].paths]
        rows, ok = extractor.features(splits[names[0]].root, paths, transform,
                                      description="+".join(names), mirror=mirror_on)
        start = 0
        for name in names:
            end = start + len(splits[name].paths)
            features[name] = (rows[start:end], ok[start:end])
            start = end
    return features


# --- the files ------------------------------------------------------------------------------

def file_facts(path):
    """(sha256 or None, (width, height) or None) of a file, its bytes read once."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, None
    digest = hashlib.sha256(data).hexdigest()  # as splits.file_digest
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return digest, image.size
    except UNREADABLE_IMAGE_ERRORS:
        return digest, None


def catalogue(class_to_idx, splits, features):
    """One row per image: path, class, split, digest, size, feature row, readable."""
    classes = list(class_to_idx)
    rows = []
    for name, split in splits.items():
        _, ok = features[name]
        for index, (path, label) in enumerate(zip(split.paths, split.labels)):
            rows.append({"path": str(path), "class": classes[label], "label": label,
                         "split": name, "ok": bool(ok[index])})
    with ThreadPoolExecutor(max_workers=4) as pool:  # file reads and hashing release the GIL
        for row, (digest, size) in zip(rows, pool.map(file_facts, [r["path"] for r in rows])):
            row["sha256"], row["size"] = digest, size
            row["ok"] = row["ok"] and size is not None
    matrix = torch.cat([features[name][0] for name in splits]).float()
    return rows, matrix


def where(row):
    return {"path": row["path"], "class": row["class"], "split": row["split"]}


def kinds_of(members):
    """Which kinds of duplicate a group of rows is: within a class, across classes, across splits."""
    classes = [row["class"] for row in members]
    kinds = []
    if len(set(classes)) < len(classes):
        kinds.append("within_class")
    if len(set(classes)) > 1:
        kinds.append("across_classes")
    if len({row["split"] for row in members}) > 1:
        kinds.append("across_splits")
    return kinds


def exact_duplicates(rows):
    """Groups of files with the same bytes, largest first."""
    groups = defaultdict(list)
    for row in rows:
        if row["sha256"]:
            groups[row["sha256"]].append(row)
    found = [{"sha256": digest, "kinds": kinds_of(members), "files": [where(r) for r in members]}
             for digest, members in groups.items() if len(members) > 1]
    return sorted(found, key=lambda group: (-len(group["files"]), group["files"][0]["path"]))


def near_duplicates(rows, matrix, threshold=NEAR_THRESHOLD, block=1024):
    """Pairs of readable images whose features' cosine similarity is >= threshold (files with
    the same bytes left out: they are exact duplicates), most similar first."""
    usable = [index for index, row in enumerate(rows) if row["ok"]]
    unit = nn.functional.normalize(matrix[usable], dim=1)
    pairs = []
    for start in range(0, len(usable), block):
        similarity = unit[start:start + block] @ unit[start:].T
        similarity = torch.triu(similarity, diagonal=1)  # each pair once, not with itself
        for first, second in (similarity >= threshold).nonzero().tolist():
            a, b = rows[usable[start + first]], rows[usable[start + second]]
            if a["sha256"] != b["sha256"]:
                pairs.append({"similarity": round(similarity[first, second].item(), 4),
                              "kinds": kinds_of([a, b]), "files": [where(a), where(b)]})
    return sorted(pairs, key=lambda pair: -pair["similarity"])


# --- likely mislabelled ---------------------------------------------------------------------

def fold_of_rows(rows, folds, seed):
    """A fold per row, stratified by class; copies of one file share a fold (no leak of a
    photo's own label through its copy)."""
    generator = torch.Generator().manual_seed(seed)
    by_class = defaultdict(list)
    for index, row in enumerate(rows):
        by_class[row["label"]].append(index)
    fold_of_digest, assigned = {}, [0] * len(rows)
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=generator).tolist()
        next_fold = int(torch.randint(folds, (1,), generator=generator))
        for position in order:
            index = members[position]
            key = rows[index]["sha256"] or rows[index]["path"]
            if key not in fold_of_digest:
                fold_of_digest[key] = next_fold
                next_fold = (next_fold + 1) % folds
            assigned[index] = fold_of_digest[key]
    return torch.tensor(assigned)


def fit_linear(features, labels, class_count, epochs=FIT_EPOCHS, weight_decay=1e-4):
    """A softmax classifier on standardised features, full-batch L-BFGS: a few seconds at most
    for thousands of images, and no learning rate to choose."""
    model = nn.Linear(features.shape[1], class_count)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=epochs,
                                  line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = nn.functional.cross_entropy(model(features), labels) + weight_decay * (
            model.weight ** 2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return model


def out_of_fold_probabilities(features, labels, folds, class_count):
    """Each image's class probabilities from a classifier that never saw it."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    standard = (features - mean) / std
    probabilities = torch.zeros(len(labels), class_count)
    for fold in range(int(folds.max()) + 1):
        held_out = folds == fold
        if held_out.all() or not held_out.any():
            continue
        model = fit_linear(standard[~held_out], labels[~held_out], class_count)
        with torch.no_grad():
            probabilities[held_out] = model(standard[held_out]).softmax(1)
    return probabilities


def confident_learning(probabilities, labels):
    """The confident-learning rule (Northcutt et al., 2021): class j's threshold is the mean
    probability of j over the images labelled j; an image is a suspect when the most likely class
    above its threshold is not its label. Returns (suspect indices ranked by self-confidence,
    lowest first, each image's suggested class)."""
    class_count = probabilities.shape[1]
    sums = torch.zeros(class_count).index_add_(0, labels,
                                               probabilities.gather(1, labels[:, None])[:, 0])
    counts = torch.bincount(labels, minlength=class_count).clamp(min=1)
    thresholds = sums / counts
    above = torch.where(probabilities >= thresholds, probabilities, torch.full_like(
        probabilities, -1.0))
    confident = above.max(1)
    suggested = torch.where(confident.values >= 0, confident.indices, probabilities.argmax(1))
    suspect = (confident.values >= 0) & (suggested != labels)
    self_confidence = probabilities.gather(1, labels[:, None])[:, 0]
    ranked = sorted(suspect.nonzero()[:, 0].tolist(), key=lambda i: self_confidence[i].item())
    return ranked, suggested


def likely_mislabelled(rows, matrix, classes, folds=FOLDS, seed=0):
    """Suspects of the confident-learning rule on out-of-fold predictions, least likely first."""
    usable = [index for index, row in enumerate(rows) if row["ok"]]
    labels = torch.tensor([rows[i]["label"] for i in usable])
    if len(usable) < 2 * folds or len(set(labels.tolist())) < 2:
        return []
    fold = fold_of_rows([rows[i] for i in usable], folds, seed)
    probabilities = out_of_fold_probabilities(matrix[usable], labels, fold, len(classes))
    ranked, suggested = confident_learning(probabilities, labels)
    return [{**where(rows[usable[i]]), "suggested": classes[suggested[i]],
             "self_confidence": round(probabilities[i, labels[i]].item(), 4),
             "suggested_probability": round(probabilities[i, suggested[i]].item(), 4)}
            for i in ranked]


# --- the whole check ------------------------------------------------------------------------

def class_counts(rows, classes):
    """{class: {split: images, ..., "total": images}} and the largest-to-smallest total ratio."""
    counts = {name: defaultdict(int) for name in classes}
    for row in rows:
        counts[row["class"]][row["split"]] += 1
        counts[row["class"]]["total"] += 1
    totals = [count["total"] for count in counts.values()]
    ratio = max(totals) / min(totals) if min(totals) else math.inf
    return {name: dict(count) for name, count in counts.items()}, ratio


def check_dataset(class_to_idx, splits, features, save_dir=None, near_threshold=NEAR_THRESHOLD,
                  tiny_side=TINY_SIDE, folds=FOLDS, seed=0):
    """The data check of splits ({name: data_utils.Split}) with features ({name: (features, ok)},
    as split_features returns). With save_dir, data_report.json and the contact sheets are
    written there. Returns the report (a JSON-ready dict)."""
    started = time.perf_counter()
    classes = list(class_to_idx)
    rows, matrix = catalogue(class_to_idx, splits, features)
    counts, ratio = class_counts(rows, classes)
    report = {
        "images": len(rows), "classes": len(classes), "class_counts": counts,
        "imbalance_ratio": ratio if math.isfinite(ratio) else None,
        "exact_duplicates": exact_duplicates(rows),
        "near_duplicates": near_duplicates(rows, matrix, near_threshold),
        "unreadable": [where(row) for row in rows if not row["ok"]],
        "tiny": [{**where(row), "width": row["size"][0], "height": row["size"][1]}
                 for row in rows if row["size"] and min(row["size"]) < tiny_side],
        "mislabelled": likely_mislabelled(rows, matrix, classes, folds, seed),
        "settings": {"near_threshold": near_threshold, "tiny_side": tiny_side, "folds": folds,
                     "seed": seed, "mislabel_rule": "confident learning on out-of-fold "
                     "predictions of a linear classifier"},
    }
    report["seconds"] = round(time.perf_counter() - started, 2)
    if save_dir is not None:
        save_report(report, save_dir)
    return report


def save_report(report, save_dir):
    """data_report.json and one contact sheet per non-empty finding in save_dir/data_check/."""
    save_dir = Path(save_dir)
    report["sheets"] = {}
    for finding, items in sheet_items(report).items():
        if items:
            path = save_dir / SHEETS_FOLDER / f"{finding}.png"
            contact_sheet(items[:SHEET_LIMIT], path,
                          f"{finding.replace('_', ' ')}: {len(items)} image(s)"
                          + (f", first {SHEET_LIMIT} shown" if len(items) > SHEET_LIMIT else ""))
            report["sheets"][finding] = str(path)
    write_json(report, save_dir / REPORT_NAME)


def sheet_items(report):
    """{finding: [(image path, caption lines)]}: the images a person should look at, worst first;
    members of a group follow each other, numbered by group."""
    items = {"exact_duplicates": [], "near_duplicates": []}
    for finding in items:
        for number, group in enumerate(report[finding], 1):
            score = f" sim {group['similarity']:.3f}" if "similarity" in group else ""
            items[finding] += [(entry["path"], [f"#{number}{score} {entry['split']}",
                                                short_path(entry["path"])])
                               for entry in group["files"]]
    items["mislabelled"] = [(entry["path"], [f"filed: {entry['class']} ({entry['self_confidence']:.2f})",
                                             f"suggested: {entry['suggested']} "
                                             f"({entry['suggested_probability']:.2f})",
                                             short_path(entry["path"])])
                            for entry in report["mislabelled"]]
    items["tiny"] = [(entry["path"], [f"{entry['width']}x{entry['height']} px",
                                      short_path(entry["path"])]) for entry in report["tiny"]]
    items["unreadable"] = [(entry["path"], ["unreadable", short_path(entry["path"])])
                           for entry in report["unreadable"]]
    return items


def short_path(path, keep=2):
    """The last folders and the file name: enough to find the file below the data folder."""
    return "/".join(Path(path).parts[-keep:])


def contact_sheet(items, path, title, thumb=150, columns=6, caption_lines=3):
    """Thumbnails in a grid, each with its caption, as one PNG (PIL only: fast, no figure)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    line = 14
    cell_height = thumb + 6 + line * caption_lines
    rows = math.ceil(len(items) / columns)
    sheet = Image.new("RGB", (columns * (thumb + 10) + 10, 30 + rows * (cell_height + 10)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 8), title, fill="black", font=ImageFont.load_default(size=14))
    for index, (image_path, caption) in enumerate(items):
        x = 10 + (index % columns) * (thumb + 10)
        y = 30 + (index // columns) * (cell_height + 10)
        try:
            image = load_image(image_path, thumb)
            image.thumbnail((thumb, thumb))
            sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        except UNREADABLE_IMAGE_ERRORS:
            draw.rectangle((x, y, x + thumb, y + thumb), fill="#dddddd")
            draw.text((x + 10, y + thumb // 2), "cannot be read", fill="black", font=font)
        for number, text in enumerate(caption[:caption_lines]):
            draw.text((x, y + thumb + 4 + number * line), fit_text(draw, text, font, thumb + 8),
                      fill="black", font=font)
    atomic_write(path, lambda temporary: sheet.save(temporary, format="PNG"))


def fit_text(draw, text, font, width):
    """text, cut from the left with '...' until it fits width pixels (file names end in what
    tells them apart)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text, font=font) > width:
        text = text[1:]
    return "..." + text


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
                     f"{Path(save_dir) / SHEETS_FOLDER}/")
    return lines


def _kind_counts(groups):
    counts = defaultdict(int)
    for group in groups:
        for kind in group["kinds"]:
            counts[kind] += 1
    return ", ".join(f"{counts[kind]} {kind.replace('_', ' ')}" for kind in
                     ("within_class", "across_classes", "across_splits")) if groups else "none"


# --- the cleaned manifest -------------------------------------------------------------------

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
        drop.update({entry["path"]: "exact duplicate" for entry in group["files"] if entry is not keep})
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
    kept = [entry for entry in manifest["files"]
            if os.path.join(data_dir / manifest["roots"][entry["split"]], entry["path"]) not in drop]
    if len(manifest["files"]) - len(kept) != len(drop):
        warn("some findings name files that are not in the manifest; they are left as they are")
    return {**manifest, "files": kept, "cleaned": {"dropped": len(drop)}}, drop
