"""The data check: what in a photo folder would mislead training or inflate the test score.

Exact duplicates (same bytes) within a class, across classes and across splits (leaks);
near-copies (re-saved, resized, slightly cropped, burst shots): nearest neighbours by the
backbone features training computes anyway (so on a warm feature cache the check costs no
backbone pass), confirmed by tiny greyscale thumbnails; unreadable and tiny images; class counts
and the imbalance ratio; and photos likely filed under the wrong class: the confident-learning
rule on out-of-fold predictions of a ridge classifier on the same features. It never moves or
deletes a file: it writes data_report.json and one contact sheet per finding, and
cleaned_manifest() turns the findings into a split manifest without them.

    features = split_features(extractor, splits, eval_transform(backbone.preprocess))
    report = check_dataset(class_to_idx, splits, features, save_dir, cache_dir)
    print("\\n".join(summary_lines(report, save_dir)))
"""
import contextlib
import hashlib
import io
import json
import math
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from common import warn, write_json
from data_utils import UNREADABLE_IMAGE_ERRORS, open_image, to_rgb
from features import FeatureCache, file_stamps
from model_utils import SignedSqrt
from reports import contact_sheet, short_path

REPORT_NAME = "data_report.json"
SHEETS_FOLDER = "data_check"
NEAR_THRESHOLD = 0.92  # thumbnail correlation; chosen on the messy folder of seed 0 (benchmarks)
CANDIDATE_SIMILARITY = 0.5  # cosine of centred features from which a neighbour is a candidate
NEIGHBOURS = 4         # candidates per image: its twin, or several copies of one photo
PROJECTED = 256        # dimensions of the random projection that finds the candidates
THUMB = 8              # side of the greyscale thumbnails that confirm a near-copy
EDGES = 16             # side of the thumbnails whose pixel differences confirm it too
THUMB_LENGTH = THUMB * THUMB + 2 * EDGES * (EDGES - 1)
EDGE_THRESHOLD = 0.6   # correlation of those differences; chosen on seed 0 (benchmarks)
RIDGE = 1.0            # of the out-of-fold classifier, on features scaled to a mean length of 1
SOFTMAX_SCALES = [2.0 ** k for k in range(12)]
TINY_SIDE = 64         # shorter side in pixels below which an image is reported as tiny
FOLDS = 5
SHEET_LIMIT = 60       # thumbnails per contact sheet, worst first
RULES_VERSION = 1      # in the report's fingerprint: bump it when what the check finds changes


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
    """(facts row: int64 [sha256 as 4 words, width, height, has digest], thumbnail row, readable)
    of one file, its bytes read once. The thumbnail row: THUMB x THUMB greyscale pixels, then the
    vertical and horizontal differences of EDGES x EDGES greyscale pixels, each part zero-mean
    and unit length (so a dot product is a correlation)."""
    facts, pixels = torch.zeros(7, dtype=torch.int64), torch.zeros(THUMB_LENGTH)
    try:
        data = Path(path).read_bytes()
    except OSError:
        return facts, pixels.half(), False
    digest = hashlib.sha256(data).digest()  # as splits.file_digest
    facts[:4] = torch.frombuffer(bytearray(digest), dtype=torch.int64)
    facts[6] = 1
    try:
        with open_image(io.BytesIO(data)) as image:  # one open: the formats load_image takes
            facts[4], facts[5] = image.size  # the stored size: before the draft decode
            image.draft("RGB", (2 * EDGES, 2 * EDGES))
            grey = to_rgb(image).convert("L")
    except UNREADABLE_IMAGE_ERRORS:
        return facts, pixels.half(), False
    small = pixel_tensor(grey, THUMB)
    edges = pixel_tensor(grey, EDGES)
    parts = [small.reshape(-1), torch.cat([edges.diff(dim=0).reshape(-1),
                                           edges.diff(dim=1).reshape(-1)])]
    parts = [part - part.mean() for part in parts]
    return facts, torch.cat([part / part.norm().clamp(min=1e-6) for part in parts]).half(), True


def pixel_tensor(grey, side):
    """A greyscale image as a side x side float tensor (box-filtered)."""
    small = grey.resize((side, side), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32).copy())


def cached_facts(paths, cache_dir, root):
    """file_facts() of paths as (facts [N, 7], thumbnails [N, THUMB_LENGTH], readable [N]),
    kept in the feature cache's folder (keyed by path, size and times, as features are), so a
    warm check reads no image."""
    cache = FeatureCache(cache_dir) if cache_dir else None
    keys = [f"{name} {THUMB} {EDGES}|{Path(root).resolve()}"
            for name in ("file facts", "thumbnails")]
    stamps = file_stamps(paths)
    cached = [cache.load(key) if cache else {} for key in keys]
    rows = [[part.get((path, *stamp)) for path, stamp in zip(paths, stamps)] for part in cached]
    missing = [index for index in range(len(paths))
               if rows[0][index] is None or rows[1][index] is None]
    with ThreadPoolExecutor(max_workers=4) as pool:  # file reads and hashing release the GIL
        for index, (facts, pixels, ok) in zip(missing, pool.map(file_facts,
                                                                 [paths[i] for i in missing])):
            rows[0][index], rows[1][index] = (facts, ok), (pixels, ok)
    facts = torch.stack([row[0] for row in rows[0]]) if paths else torch.zeros(0, 7,
                                                                               dtype=torch.int64)
    pixels = torch.stack([row[0] for row in rows[1]]) if paths else torch.zeros(0, THUMB_LENGTH)
    ok = torch.tensor([bool(row[1]) for row in rows[0]], dtype=torch.bool)
    if cache and (missing or len(cached[0]) != len(paths) or len(cached[1]) != len(paths)):
        cache.save(keys[0], paths, stamps, facts, ok)
        cache.save(keys[1], paths, stamps, pixels, ok)
    return facts, pixels.float(), ok


def split_facts(splits, cache_dir):
    """cached_facts() of every split's images in split order, one call (and cache file) per
    folder, as split_features groups them."""
    groups = defaultdict(list)
    for name, split in splits.items():
        groups[str(Path(split.root).resolve())].append(name)
    by_split = {}
    for names in groups.values():
        paths = [path for name in names for path in splits[name].paths]
        parts = cached_facts(paths, cache_dir, splits[names[0]].root)
        sizes = [len(splits[name].paths) for name in names]
        for name, *pieces in zip(names, *(part.split(sizes) for part in parts)):
            by_split[name] = pieces
    return [torch.cat([by_split[name][part] for name in splits]) for part in range(3)]


def catalogue(class_to_idx, splits, features, cache_dir):
    """(one row per image: path, class, label, split, readable, sha256, size; the features
    [N, D] float32; the thumbnails [N, THUMB * THUMB]), in split order."""
    classes = list(class_to_idx)
    facts, pixels, readable = split_facts(splits, cache_dir)
    ok = torch.cat([features[name][1] for name in splits]) & readable
    rows = [{"path": str(path), "class": classes[label], "label": label, "split": name}
            for name, split in splits.items() for path, label in zip(split.paths, split.labels)]
    for row, fact, good in zip(rows, facts.tolist(), ok.tolist()):
        row["ok"] = good
        row["sha256"] = (torch.tensor(fact[:4]).numpy().tobytes().hex() if fact[6] else None)
        row["size"] = (fact[4], fact[5]) if good else None
    matrix = torch.cat([features[name][0] for name in splits]).float()
    return rows, matrix, pixels


def where(row):
    return {"path": row["path"], "class": row["class"], "split": row["split"]}


def kinds_of(members):
    """The kinds of duplicate a group of rows is: within a class, across classes, across splits."""
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


def feature_space(matrix, usable):
    """Signed square root, centred on the mean image, scaled to a mean length of 1: raw pooled
    features are all positive, so any two flowers look alike (cosine ~0.8) until centred."""
    roots = SignedSqrt()(matrix.float())
    if not usable.any():
        return roots
    centred = roots - roots[usable].mean(0)
    return centred / centred[usable].norm(dim=1).mean().clamp(min=1e-6)


def nearest_neighbours(unit, neighbours=NEIGHBOURS, block=2048):
    """[N, neighbours] indices of each row's most similar other rows (rows of unit are
    L2-normalised), searched in a random projection to PROJECTED dimensions (cosines kept to
    about +-0.06: 5x less work, and the candidates are checked in full after), one block of
    rows at a time to bound memory."""
    if unit.shape[1] > PROJECTED:
        projection = torch.randn(unit.shape[1], PROJECTED,
                                 generator=torch.Generator().manual_seed(0))
        unit = nn.functional.normalize(unit @ projection, dim=1)
    indices = []
    for start in range(0, len(unit), block):
        similarity = unit[start:start + block] @ unit.T
        rows = torch.arange(start, min(start + block, len(unit)))
        similarity[rows - start, rows] = -2.0  # not itself
        indices.append(similarity.topk(min(neighbours, len(unit) - 1), dim=1).indices)
    return torch.cat(indices)


def near_duplicates(rows, space, pixels, threshold=NEAR_THRESHOLD):
    """Pairs of readable images that are near-copies of each other, most alike first: each
    image and its nearest neighbours by the backbone's features (the candidates), kept where
    the features' cosine similarity is >= CANDIDATE_SIMILARITY, their 8 x 8 greyscale
    thumbnails correlate >= threshold and their 16 x 16 pixel differences >= EDGE_THRESHOLD (the
    features find the photo's twin among thousands; the pixels tell a re-saved copy or a burst
    shot from another photo of a look-alike flower). Files
    with the same bytes are left out: they are exact duplicates."""
    usable = [index for index, row in enumerate(rows) if row["ok"]]
    if len(usable) < 2:
        return []
    unit = nn.functional.normalize(space[usable], dim=1)
    neighbour = nearest_neighbours(unit)
    first = torch.arange(len(usable)).repeat_interleave(neighbour.shape[1])
    second = neighbour.reshape(-1)
    similarity = (unit[first] * unit[second]).sum(1)
    products = pixels[usable][first] * pixels[usable][second]
    correlation = products[:, :THUMB * THUMB].sum(1)
    edges = products[:, THUMB * THUMB:].sum(1)
    alike = ((similarity >= CANDIDATE_SIMILARITY) & (correlation >= threshold)
             & (edges >= EDGE_THRESHOLD))
    pairs = {}
    for candidate in alike.nonzero()[:, 0].tolist():
        a, b = sorted((usable[first[candidate]], usable[second[candidate]]))
        if (a, b) not in pairs and rows[a]["sha256"] != rows[b]["sha256"]:
            pairs[(a, b)] = {"pixel_correlation": round(correlation[candidate].item(), 4),
                             "edge_correlation": round(edges[candidate].item(), 4),
                             "similarity": round(similarity[candidate].item(), 4),
                             "kinds": kinds_of([rows[a], rows[b]]),
                             "files": [where(rows[a]), where(rows[b])]}
    return sorted(pairs.values(), key=lambda pair: (-pair["pixel_correlation"],
                                                    -pair["similarity"]))


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


def out_of_fold_probabilities(features, labels, folds, class_count, ridge=RIDGE):
    """Each image's class probabilities from a classifier that never saw it: ridge regression
    onto one-hot labels (closed form: one Gram matrix for all folds, a fold's own rows
    subtracted, so the whole check stays within seconds), its scores turned into probabilities
    by the softmax scale with the lowest out-of-fold loss (powers of two)."""
    targets = nn.functional.one_hot(labels, class_count).float()
    gram, cross = features.T @ features, features.T @ targets
    identity = torch.eye(features.shape[1])
    scores = torch.zeros(len(labels), class_count)
    for fold in folds.unique().tolist():
        held = folds == fold
        inputs = features[held]
        factor = torch.linalg.cholesky(gram - inputs.T @ inputs + ridge * identity)
        weights = torch.cholesky_solve(cross - inputs.T @ targets[held], factor)
        scores[held] = inputs @ weights
    scale = min(SOFTMAX_SCALES,
                key=lambda c: nn.functional.cross_entropy(scores * c, labels).item())
    return (scores * scale).softmax(1)


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


def likely_mislabelled(rows, space, classes, folds=FOLDS, seed=0):
    """Suspects of the confident-learning rule on out-of-fold predictions, least likely first."""
    usable = [index for index, row in enumerate(rows) if row["ok"]]
    labels = torch.tensor([rows[i]["label"] for i in usable], dtype=torch.long)
    if len(usable) < 2 * folds or len(set(labels.tolist())) < 2:
        return []
    fold = fold_of_rows([rows[i] for i in usable], folds, seed)
    probabilities = out_of_fold_probabilities(space[usable], labels, fold, len(classes))
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


def check_dataset(class_to_idx, splits, features, save_dir=None, cache_dir=None,
                  near_threshold=NEAR_THRESHOLD, tiny_side=TINY_SIDE, folds=FOLDS, seed=0):
    """The data check of splits ({name: data_utils.Split}) with features ({name: (features, ok)},
    as split_features returns). cache_dir: the feature cache's folder, where the thumbnails are
    kept too (None: computed each time). With save_dir, data_report.json and the contact sheets
    are written there; a report already there from the same files, features and settings is
    returned as it is (a rerun on unchanged data checks nothing again). Returns the report (a
    JSON-ready dict)."""
    started = time.perf_counter()
    settings = {"near_threshold": near_threshold, "edge_threshold": EDGE_THRESHOLD,
                "tiny_side": tiny_side, "folds": folds, "seed": seed,
                "mislabel_rule": "confident learning on out-of-fold predictions of a ridge "
                "classifier on the features"}
    fingerprint = report_fingerprint(class_to_idx, splits, features, settings)
    if save_dir is not None and (kept := kept_report(save_dir, fingerprint)):
        return {**kept, "kept": True}
    classes = list(class_to_idx)
    rows, matrix, pixels = catalogue(class_to_idx, splits, features, cache_dir)
    usable = torch.tensor([row["ok"] for row in rows], dtype=torch.bool)
    space = feature_space(matrix, usable)
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
        save_report(report, save_dir)
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


def save_report(report, save_dir):
    """data_report.json and one contact sheet per non-empty finding in save_dir/data_check/."""
    save_dir = Path(save_dir)
    with contextlib.suppress(OSError):  # an earlier report never meets new sheets (unwritable:
        (save_dir / REPORT_NAME).unlink(missing_ok=True)  # write_json below says so)
    report["sheets"] = {}
    for finding, items in sheet_items(report).items():
        if items:
            path = save_dir / SHEETS_FOLDER / f"{finding}.png"
            contact_sheet(items[:SHEET_LIMIT], path,
                          f"{finding.replace('_', ' ')}: {len(report[finding])} found"
                          + (f"; the first {SHEET_LIMIT} of their {len(items)} images shown"
                             if len(items) > SHEET_LIMIT else ""))
            report["sheets"][finding] = str(path)
    write_json(report, save_dir / REPORT_NAME)


def sheet_items(report):
    """{finding: [(image path, caption lines)]}: the images a person should look at, worst first;
    members of a group follow each other, numbered by group."""
    items = {"exact_duplicates": [], "near_duplicates": []}
    for finding in items:
        for number, group in enumerate(report[finding], 1):
            score = (f" r {group['pixel_correlation']:.3f}" if "pixel_correlation" in group
                     else "")
            items[finding] += [(entry["path"], [f"#{number}{score} {entry['split']}",
                                                short_path(entry["path"])])
                               for entry in group["files"]]
    items["mislabelled"] = [
        (entry["path"], [f"filed: {entry['class']} ({entry['self_confidence']:.2f})",
                         f"suggested: {entry['suggested']} ({entry['suggested_probability']:.2f})",
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
