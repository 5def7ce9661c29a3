"""The photos worth labelling: predict.py photos/ checkpoint.pth --suggest N lists the N photos
whose label would teach the model most: the ones it is least sure of, but never two near-copies.

    from flower_classifier.inference.suggest import suggest_photos
    for record in suggest_photos(predictor, "unlabelled/", 20):
        record.path, record.name, record.certainty, record.group   # grouped, least sure first

One pass over the photos (the Predictor's stream, decoding workers and all) scores each photo's
certainty: the margin between its top two classes' probabilities (by="margin"), or one less its
entropy over the log of the number of classes (by="entropy"); 0 is the least sure. Only a pool
of the pool_factor * N least sure photos is kept, in a heap, with their backbone features
(which the same pass computed), so memory does not grow with the number of photos. From the
pool, least sure first, a photo is chosen unless its feature's cosine similarity to one
already chosen is above max_similarity: twenty near-copies of one confusing photo give one.
Photos the unknown verdict rejects (none of the classes) and unreadable files are left out.
The choice is then grouped by predicted class, so that a person confirms a batch at once:
groups in the order of their least sure photo, least sure first within a group.
"""
import heapq
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from flower_classifier.data.folders import iter_images
from flower_classifier.inference.predictor import BATCH_SIZE
from flower_classifier.utils.errors import UserError

BY = ("margin", "entropy")
POOL_FACTOR = 10  # candidates kept per photo asked for
MAX_SIMILARITY = 0.95  # cosine of backbone features above which two photos are near-copies


@dataclass
class Suggestion:
    """One photo worth labelling: its predicted class (folder name, display name), its top
    classes, its certainty (0: the least sure) and its group (the predicted display name)."""
    path: str
    predicted: str
    name: str
    certainty: float
    group: str
    classes: list = field(default_factory=list)
    names: list = field(default_factory=list)
    probabilities: list = field(default_factory=list)

    def as_json(self):
        return asdict(self)


@dataclass
class Tally:
    """What the pass saw besides the suggestions."""
    photos: int = 0
    unreadable: int = 0
    unknown: int = 0


def certainties(probabilities, by="margin"):
    """[N] certainty of each row of class probabilities [N, C]: 0 is the least sure."""
    if by == "margin":
        top = probabilities.topk(min(2, probabilities.shape[1]), dim=1).values
        return top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=1)
    return 1 - entropy / math.log(max(probabilities.shape[1], 2))


def candidate_pool(predictor, paths, size, by, batch_size, workers, tally, job_size=None):
    """The `size` least sure readable, known photos of paths, as (certainty, index, path,
    probabilities, unit feature), least sure first; a heap holds them while streaming.
    job_size: the number of paths, for the engine's choice."""
    heap = []  # (-certainty, -index, ...): heap[0] is the surest kept, the first to go
    items = enumerate(paths)
    for batch, errors, outputs in predictor.output_batches(items, batch_size, workers,
                                                           job_size):
        tally.photos += len(batch)
        tally.unreadable += sum(error is not None for error in errors)
        if outputs is None:
            continue
        probabilities, known, features = outputs
        features = torch.nn.functional.normalize(features, dim=1)
        scores = certainties(probabilities, by).tolist()
        readable = [item for item, error in zip(batch, errors) if error is None]
        for row, ((index, path), score) in enumerate(zip(readable, scores)):
            if known is not None and not known[row]:
                tally.unknown += 1
                continue
            if len(heap) >= size and -score <= heap[0][0]:
                continue  # surer than every photo kept
            entry = (-score, -index, path, probabilities[row].clone(), features[row].clone())
            (heapq.heappushpop if len(heap) >= size else heapq.heappush)(heap, entry)
    return sorted(((-score, -index, path, probabilities, feature)
                   for score, index, path, probabilities, feature in heap),
                  key=lambda entry: entry[:2])


def diverse(pool, count, max_similarity, per_class=None):
    """Up to count entries of the pool (least sure first), skipping each whose feature's
    cosine similarity to one already chosen is above max_similarity. per_class: at most that
    many per predicted class in a first pass, so that one confusing class does not fill the
    list; a second pass fills what is left with the least sure of the rest (issue 34's class
    spread: benchmarks/active_learning.py measures it, not better than without, so --suggest
    does not use it)."""
    chosen, features, per_group = [], [], Counter()
    for spread in (True, False) if per_class else (False,):
        for entry in pool:
            if len(chosen) == count:
                return chosen
            group = int(entry[3].argmax())
            if any(entry is taken for taken in chosen) or (
                    spread and per_group[group] >= per_class):
                continue
            if features and float((torch.stack(features) @ entry[4]).max()) > max_similarity:
                continue
            chosen.append(entry)
            features.append(entry[4])
            per_group[group] += 1
    return chosen


def suggest_photos(predictor, source, count, by="margin", max_similarity=MAX_SIMILARITY,
                   pool_factor=POOL_FACTOR, top_k=3, batch_size=BATCH_SIZE, workers=None,
                   tally=None):
    """The Suggestion records of up to count photos below the folder source (or of an
    iterable of paths), grouped by predicted class; fewer when the pool runs out of photos
    that are not near-copies of one chosen. tally: a Tally to count what was seen."""
    if by not in BY:
        raise UserError(f"cannot rank photos by {by!r}; choose one of {', '.join(BY)}")
    if isinstance(source, (str, os.PathLike)):
        photos = sum(1 for _ in iter_images(source))  # a stream: nothing holds the list
        paths = iter_images(source)
    else:
        paths = list(source)
        photos = len(paths)
    if not photos:
        raise UserError(f"{source} holds no images; pass a folder with JPEG or PNG files")
    tally = Tally() if tally is None else tally
    pool = candidate_pool(predictor, paths, count * pool_factor, by, batch_size, workers, tally,
                          photos)
    records = [record(predictor, path, score, probabilities, top_k)
               for score, _, path, probabilities, _ in diverse(pool, count, max_similarity)]
    return grouped(records, lambda suggestion: suggestion.group)


def grouped(items, group_of):
    """items grouped by group_of(item): the groups in the order of their first item, each
    group's items in their order (least sure first, for a choice made least sure first)."""
    first = {}
    for position, item in enumerate(items):
        first.setdefault(group_of(item), position)
    return sorted(items, key=lambda item: first[group_of(item)])


def record(predictor, path, score, probabilities, top_k):
    values, indices = probabilities.topk(min(top_k, len(predictor.classes)))
    indices = indices.tolist()
    return Suggestion(str(path), predictor.classes[indices[0]], predictor.names[indices[0]],
                      round(score, 6), predictor.names[indices[0]],
                      [predictor.classes[i] for i in indices],
                      [predictor.names[i] for i in indices], values.tolist())
