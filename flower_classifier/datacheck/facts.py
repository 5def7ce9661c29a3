"""What the data check reads of each file, once: its digest, its size and tiny thumbnails,
kept in the feature cache's folder so a warm check reads no image.

    facts, thumbnails, readable = split_facts(splits, cache_dir)
"""
import hashlib
import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flower_classifier.data.images import UNREADABLE_IMAGE_ERRORS, open_image, to_rgb
from flower_classifier.models.features import FeatureCache, file_stamps
from flower_classifier.utils.threads import cores_available

THUMB = 8              # side of the greyscale thumbnails that confirm a near-copy
EDGES = 16             # side of the thumbnails whose pixel differences confirm it too
THUMB_LENGTH = THUMB * THUMB + 2 * EDGES * (EDGES - 1)
FACTS_BATCH = 64       # files per batch a worker process hands back
FEWEST_FOR_WORKERS = 512  # fewer files are read in this process: workers cost more to start


def file_facts(path, views=None):
    """(facts row: int64 [sha256 as 4 words, width, height, has digest], thumbnail row,
    readable, viewed) of one file, its bytes read once. The thumbnail row: THUMB x THUMB
    greyscale pixels, then the vertical and horizontal differences of EDGES x EDGES greyscale
    pixels, each part zero-mean and unit length (so a dot product is a correlation).
    views.keep(path, data, decoded), when given, makes a view for people from what was read
    (studio.thumbnails.CheckThumbnails); viewed: whether it is on disk."""
    facts, pixels = torch.zeros(7, dtype=torch.int64), torch.zeros(THUMB_LENGTH)
    try:
        data = Path(path).read_bytes()
    except OSError:
        return facts, pixels.half(), False, False
    digest = hashlib.sha256(data).digest()  # as data.split.file_digest
    facts[:4] = torch.frombuffer(bytearray(digest), dtype=torch.int64)
    facts[6] = 1
    try:
        with open_image(io.BytesIO(data)) as image:  # one open: the formats load_image takes
            facts[4], facts[5] = image.size  # the stored size: before the draft decode
            image.draft("RGB", (2 * EDGES, 2 * EDGES))
            decoded = to_rgb(image)
    except UNREADABLE_IMAGE_ERRORS:
        return facts, pixels.half(), False, False
    grey = decoded.convert("L")
    viewed = bool(views and views.keep(path, data, decoded))
    small = pixel_tensor(grey, THUMB)
    edges = pixel_tensor(grey, EDGES)
    parts = [small.reshape(-1), torch.cat([edges.diff(dim=0).reshape(-1),
                                           edges.diff(dim=1).reshape(-1)])]
    parts = [part - part.mean() for part in parts]
    return (facts, torch.cat([part / part.norm().clamp(min=1e-6) for part in parts]).half(), True,
            viewed)


class FileFacts(torch.utils.data.Dataset):
    """file_facts() of each path, for a DataLoader's worker processes: most of it holds the GIL
    (a tiny decode, small tensor sums), so threads did not overlap it (benchmarks/README.md,
    "The studio at 50,000 photos")."""

    def __init__(self, paths, views=None):
        self.paths, self.views = paths, views

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return file_facts(self.paths[index], self.views)


def read_facts(paths, views=None):
    """[file_facts()] of paths, in order: on worker processes, one per core, when there are
    many (the views' `kept` gets the paths whose view is on disk)."""
    workers = min(cores_available(), 6) if len(paths) >= FEWEST_FOR_WORKERS else 0
    loader = torch.utils.data.DataLoader(FileFacts(paths, views), batch_size=FACTS_BATCH,
                                         num_workers=workers)
    rows = [row for batch in loader for row in zip(*batch)]
    if views:
        views.kept.update(str(path) for path, row in zip(paths, rows) if row[3])
    return rows


def pixel_tensor(grey, side):
    """A greyscale image as a side x side float tensor (box-filtered)."""
    small = grey.resize((side, side), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32).copy())


def cached_facts(paths, cache_dir, root, views=None):
    """file_facts() of paths as (facts [N, 7], thumbnails [N, THUMB_LENGTH], readable [N]),
    kept in the feature cache's folder (keyed by path, size and times, as features are), so a
    warm check reads no image (nor makes views)."""
    cache = FeatureCache(cache_dir) if cache_dir else None
    keys = [f"{name} {THUMB} {EDGES}|{Path(root).resolve()}"
            for name in ("file facts", "thumbnails")]
    stamps = file_stamps(paths)
    cached = [cache.load(key) if cache else {} for key in keys]
    rows = [[part.get((path, *stamp)) for path, stamp in zip(paths, stamps)] for part in cached]
    missing = [index for index in range(len(paths))
               if rows[0][index] is None or rows[1][index] is None]
    for index, (facts, pixels, ok, _) in zip(missing, read_facts([paths[i] for i in missing],
                                                                 views)):
        rows[0][index], rows[1][index] = (facts, bool(ok)), (pixels, bool(ok))
    facts = torch.stack([row[0] for row in rows[0]]) if paths else torch.zeros(0, 7,
                                                                               dtype=torch.int64)
    pixels = torch.stack([row[0] for row in rows[1]]) if paths else torch.zeros(0, THUMB_LENGTH)
    ok = torch.tensor([bool(row[1]) for row in rows[0]], dtype=torch.bool)
    if cache and (missing or len(cached[0]) != len(paths) or len(cached[1]) != len(paths)):
        cache.save(keys[0], paths, stamps, facts, ok)
        cache.save(keys[1], paths, stamps, pixels, ok)
    return facts, pixels.float(), ok


def split_facts(splits, cache_dir, views=None):
    """cached_facts() of every split's images in split order, one call (and cache file) per
    folder, as split_features groups them."""
    groups = defaultdict(list)
    for name, split in splits.items():
        groups[str(Path(split.root).resolve())].append(name)
    by_split = {}
    for names in groups.values():
        paths = [path for name in names for path in splits[name].paths]
        parts = cached_facts(paths, cache_dir, splits[names[0]].root, views)
        sizes = [len(splits[name].paths) for name in names]
        for name, *pieces in zip(names, *(part.split(sizes) for part in parts)):
            by_split[name] = pieces
    return [torch.cat([by_split[name][part] for name in splits]) for part in range(3)]


def catalogue(class_to_idx, splits, features, cache_dir, views=None):
    """(one row per image: path, class, label, split, readable, sha256, size; the features
    [N, D] float32; the thumbnails [N, THUMB * THUMB]), in split order."""
    classes = list(class_to_idx)
    facts, pixels, readable = split_facts(splits, cache_dir, views)
    ok = torch.cat([features[name][1] for name in splits]) & readable
    rows = [{"path": str(path), "class": classes[label], "label": label, "split": name}
            for name, split in splits.items() for path, label in zip(split.paths, split.labels)]
    for row, fact, good in zip(rows, facts.tolist(), ok.tolist()):
        row["ok"] = good
        row["sha256"] = (torch.tensor(fact[:4]).numpy().tobytes().hex() if fact[6] else None)
        row["size"] = (fact[4], fact[5]) if good else None
    matrix = torch.cat([features[name][0] for name in splits]).float()
    return rows, matrix, pixels
