"""Backbone features, computed once per image and kept on disk.

With a frozen backbone the features of an image never change, so train.py computes them once
(batched, through the fastest engine of models/engines.py, worker processes decoding ahead of the
model, large JPEGs draft-decoded) and trains the head on them. The cache keys each image by what
changes its features: the backbone and its weights, the engine and its precision, the exact
transform (and the view's seed), the file's path, size and mtime.

With --train_stages the same machinery keeps, instead of the features, the activations that
enter the trained stages (models/stages.py), the image's and its mirror image's side by side.

    extractor = FeatureExtractor(backbone, device, cache_dir="~/.cache/flower_classifier")
    features, ok = extractor.features(split.root, split.paths, eval_transform(backbone.preprocess))
"""
import hashlib
import os
from collections import defaultdict
from pathlib import Path

import torch

from flower_classifier.data.loading import ImageFiles, default_workers, image_loader
from flower_classifier.models.classifier import backbone_features
from flower_classifier.models.engines import compile_backbone, weights_key
from flower_classifier.utils import distributed
from flower_classifier.utils.console import progress, warn
from flower_classifier.utils.errors import UserError
from flower_classifier.utils.files import atomic_write

CACHE_FORMAT = 2


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flower_classifier" / "features"


def file_stamps(paths):
    """(size, mtime, ctime in ns) of each file: what tells a changed file from the cached one
    (ctime changes even when a copy keeps the old mtime). A vanished file gets (-1, -1, -1)."""
    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
            stamps.append((stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
        except OSError:  # a broken symlink: its image will be reported unreadable
            stamps.append((-1, -1, -1))
    return stamps


# Cache folders a write failed in, this process: warned about once, then left alone.
UNWRITABLE_CACHE_DIRS = set()


class FeatureCache:
    """One file per (backbone, transform, view, folder): paths, stamps, float16 features."""

    def __init__(self, cache_dir):
        self.cache_dir = Path(cache_dir).expanduser()

    def path(self, key):
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def load(self, key):
        """{(path, size, mtime): (feature row, ok)} of the cache file, empty if missing or damaged."""
        path = self.path(key)
        if not path.exists():
            return {}
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            rows = zip(entry["paths"], entry["stamps"].tolist(), entry["features"],
                       entry["ok"].tolist(), strict=True)
            if entry["format"] != CACHE_FORMAT or entry["key"] != key:
                raise ValueError("written for another key or format")
            return {(p, *stamp): (feature, ok) for p, stamp, feature, ok in rows}
        except Exception as error:  # any damage at all means: rebuild, never crash the run
            warn(f"feature cache {path} is damaged ({type(error).__name__}: {error}); rebuilding it")
            return {}

    def save(self, key, paths, stamps, features, ok):
        """Write one cache file. The cache is optional: where writing fails (a full disk, a
        read-only --cache_dir) one warning says so and later saves are skipped; reading goes on."""
        if self.cache_dir in UNWRITABLE_CACHE_DIRS:
            return
        entry = {"format": CACHE_FORMAT, "key": key, "paths": list(map(str, paths)),
                 "stamps": torch.tensor(stamps, dtype=torch.int64).reshape(-1, 3),
                 "features": features, "ok": ok}
        try:
            atomic_write(self.path(key), lambda temporary: torch.save(entry, temporary))
        except UserError as error:
            warn(f"feature cache not saved ({error}); going on without it")
            UNWRITABLE_CACHE_DIRS.add(self.cache_dir)


class FeatureExtractor:
    """Features of image files through a frozen backbone, from the cache where possible.

    Under torchrun each rank computes its share of the missing images and all ranks get all
    features. `computed` counts the images that all ranks together ran through the backbone,
    `requested` the images asked for (from the cache or computed).
    engine and images (the job's size) pick the engine: see engines.compile_backbone.
    bottom: models.stages' bottom of the backbone, to keep the activations that enter its last
    `trained_stages` stages instead of the features; with mirror, the image's and its mirror
    image's are kept side by side ([N, 2, C, H, W]), not averaged.
    """

    def __init__(self, backbone, device, cache_dir=None, batch_size=64, workers=None,
                 engine="auto", images=None, bottom=None, trained_stages=0):
        weights = weights_key(backbone.name, backbone.weights if backbone.pretrained else None,
                              backbone.model.state_dict())
        # What the engine computes: part of the cache key and the converted model's name.
        self.output = f"input of stage -{trained_stages}" if bottom is not None else "features"
        self.engine = compile_backbone(backbone.model if bottom is None else bottom,
                                       backbone.preprocess.crop, device, engine, images,
                                       weights=weights if bottom is None
                                       else f"{weights} {self.output}")
        self.spec, self.device, self.batch_size = backbone, device, batch_size
        self.workers = default_workers() if workers is None else workers
        self.cache = FeatureCache(cache_dir) if cache_dir else None
        self.computed = self.requested = 0

    def features(self, root, paths, transform, seeds=None, view="eval", description="features",
                 mirror=False):
        """(float16 features [N, D] on the CPU, bool ok [N]) of the images paths below root;
        ok is False for unreadable files. mirror: each image's features averaged with those of
        its mirror image."""
        key = "|".join([self.spec.name, repr(self.spec.weights), repr(transform), view,
                        str(Path(root).resolve()), self.device.type, self.engine.name,
                        self.engine.precision, f"draft {self.spec.preprocess.resize}"]
                       + (["mirror-averaged"] if mirror else [])
                       + ([self.output] if self.output != "features" else []))
        stamps = file_stamps(paths)
        self.requested += len(paths)
        cached = self.cache.load(key) if self.cache else {}
        rows = [cached.get((str(path), *stamp)) for path, stamp in zip(paths, stamps)]
        missing = [index for index, row in enumerate(rows) if row is None]
        # All ranks must agree on what to compute, or the gathering collective would hang.
        missing = sorted(set().union(*distributed.gather_objects(set(missing))))
        if missing:
            self.computed += len(missing)
            computed = self._compute_shared(missing, paths, transform, seeds, description, mirror)
            for index, row in zip(missing, computed):
                rows[index] = row
        features = torch.stack([row[0] for row in rows]) if rows else torch.empty(0, 0)
        ok = torch.tensor([bool(row[1]) for row in rows], dtype=torch.bool)
        if self.cache and (missing or len(cached) != len(rows)) and distributed.is_main():
            self.cache.save(key, paths, stamps, features, ok)
        return features, ok

    def _compute_shared(self, missing, paths, transform, seeds, description, mirror):
        """Rank r computes missing[r::world]; the shares are gathered back into order."""
        mine = distributed.shard(missing)
        dataset = ImageFiles([paths[i] for i in mine], transform, self.spec.preprocess.crop,
                             seeds=None if seeds is None else [seeds[i] for i in mine],
                             draft=self.spec.preprocess.resize)
        features, ok = self.compute(dataset, description, mirror)
        shares = distributed.gather_objects((features, ok))
        rows = [None] * len(missing)
        for rank, (share_features, share_ok) in enumerate(shares):
            positions = range(rank, len(missing), len(shares))
            for position, feature, good in zip(positions, share_features, share_ok.tolist()):
                rows[position] = (feature, good)
        return rows

    @torch.inference_mode()
    def compute(self, dataset, description="features", mirror=False):
        """Run the backbone over a dataset of (image, ok) pairs (mirror: see features())."""
        loader = image_loader(dataset, self.batch_size, self.workers if len(dataset) > 1 else 0,
                              self.device)
        features, ok = [], []
        batches = (progress(loader, len(loader), f"extracting {description}", unit="batches")
                   if distributed.is_main() else loader)
        for images, _, good in batches:
            features.append(self.outputs(images, mirror).cpu().half())
            ok.append(good)
        if not features:
            return torch.empty(0, self.spec.feature_dim, dtype=torch.float16), torch.empty(
                0, dtype=torch.bool)
        return torch.cat(features), torch.cat(ok)

    def outputs(self, images, mirror):
        """The features of a batch (mirror-averaged with mirror), or the activations (the
        image's and its mirror image's side by side with mirror)."""
        if self.output == "features":
            return backbone_features(self.engine, images, mirror)
        views = [images, images.flip(3)] if mirror else [images]
        return torch.stack([self.engine(view).contiguous() for view in views], 1)


def extraction_summary(computed, requested):
    """What a run says of its features: how many images went through the backbone and how many
    came from the cache, only what is true ("12 images through the backbone, none cached")."""
    from_cache = requested - computed
    if not from_cache:
        return f"{computed} images through the backbone, none from the cache"
    if not computed:
        return f"0 images through the backbone, all {from_cache} from the cache"
    return f"{computed} images through the backbone, {from_cache} from the cache"


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
