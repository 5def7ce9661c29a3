"""The findings of the data check, from its catalogue of rows, features and thumbnails:
exact duplicates, near-copies and likely mislabelled photos.

    groups = exact_duplicates(rows)
    pairs = near_duplicates(rows, feature_space(matrix, usable), thumbnails)
    suspects = likely_mislabelled(rows, feature_space(matrix, usable), classes)
"""
from collections import defaultdict

import torch
from torch import nn

from flower_classifier.datacheck.facts import THUMB
from flower_classifier.models.classifier import SignedSqrt

NEAR_THRESHOLD = 0.92  # thumbnail correlation; chosen on the messy folder of seed 0 (benchmarks)
CANDIDATE_SIMILARITY = 0.5  # cosine of centred features from which a neighbour is a candidate
NEIGHBOURS = 4         # candidates per image: its twin, or several copies of one photo
PROJECTED = 256        # dimensions of the random projection that finds the candidates
EDGE_THRESHOLD = 0.6   # correlation of those differences; chosen on seed 0 (benchmarks)
RIDGE = 1.0            # of the out-of-fold classifier, on features scaled to a mean length of 1
SOFTMAX_SCALES = [2.0 ** k for k in range(12)]
FOLDS = 5
PAIR_BLOCK = 16384     # candidate pairs compared at once, to bound the memory of their rows


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
    roots -= roots[usable].mean(0)  # in place: at 50,000 images a copy is a quarter gigabyte
    roots /= roots.norm(dim=1)[usable].mean().clamp(min=1e-6)
    return roots


def nearest_neighbours(unit, neighbours=NEIGHBOURS, block=512):
    """[N, neighbours] indices of each row's most similar other rows (rows of unit are
    L2-normalised), searched in a random projection to PROJECTED dimensions (cosines kept to
    about +-0.06: 5x less work, and the candidates are checked in full after), one block of
    rows at a time to bound memory (a block's similarities to 50,000 images: 100 MB)."""
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


def pair_dots(matrix, first, second, parts, block=PAIR_BLOCK):
    """[K, len(parts)]: for each pair (first[k], second[k]), the dot product of those two rows of
    matrix over each column slice in parts; a block of pairs at a time, since the gathered rows
    of 50,000 images' candidates would take gigabytes at once."""
    dots = [torch.zeros(0, len(parts))]
    for a, b in zip(first.split(block), second.split(block)):
        products = matrix[a] * matrix[b]
        dots.append(torch.stack([products[:, part].sum(1) for part in parts], 1))
    return torch.cat(dots)


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
    unit = space[usable]
    unit /= unit.norm(dim=1, keepdim=True).clamp(min=1e-12)  # nn.functional.normalize, in place
    neighbour = nearest_neighbours(unit)
    first = torch.arange(len(usable)).repeat_interleave(neighbour.shape[1])
    second = neighbour.reshape(-1)
    similarity = pair_dots(unit, first, second, [slice(None)])[:, 0]
    correlation, edges = pair_dots(pixels[usable], first, second, [
        slice(None, THUMB * THUMB), slice(THUMB * THUMB, None)]).unbind(1)
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
