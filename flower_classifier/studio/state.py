"""What the studio holds: the folder's photos (each known by its id, an index into one list),
their features, the data check's findings, and the decisions in corrections.json.

    studio = open_studio(StudioOptions("photos", save_dir="studio"), torch.device("cpu"))
    studio.decide([{"id": 3, "label": None}])      # written to corrections.json at once
"""
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from flower_classifier.data.class_names import display_names, load_category_names
from flower_classifier.data.corrections import (
    CORRECTIONS_NAME,
    FORGET,
    load_corrections,
    photo_keys,
    record_decisions,
)
from flower_classifier.data.images import is_image_file
from flower_classifier.data.reorganise import apply_moves, plan_moves, undo_moves
from flower_classifier.data.split import DEFAULT_FRACTIONS, MANIFEST_NAME, load_dataset
from flower_classifier.data.transforms import eval_transform
from flower_classifier.datacheck.report import check_dataset
from flower_classifier.models.backbones import DEFAULT_ARCH, build_backbone
from flower_classifier.models.features import (
    FeatureExtractor,
    default_cache_dir,
    split_features,
)
from flower_classifier.serve.answers import BadRequest
from flower_classifier.utils.console import log
from flower_classifier.utils.errors import UserError

MAX_CHANGES = 10_000  # decisions in one request
SET_ASIDE_FOLDER = "set_aside"  # where applying to the folders moves dropped photos
MOVES_LOG = "moves.jsonl"
# A gallery's page on the studio's page (studio.js SHOWN, and SHOWN / 4 for groups).
PHOTOS_SHOWN, GROUPS_SHOWN = 120, 30


@dataclass(frozen=True)
class StudioOptions:
    """What studio.py opens and where it keeps its files."""
    data_dir: str
    save_dir: str = "studio"
    arch: str = DEFAULT_ARCH
    cache_dir: str | None = field(default_factory=lambda: str(default_cache_dir()))
    workers: int = 0
    split: dict = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    split_from: str | None = None
    category_names: str | None = None  # None: data_dir/cat_to_name.json when present


@dataclass
class Photo:
    id: int
    path: str      # as the folder listing gave it (below the data folder)
    label: int     # the class it is filed under
    split: str
    row: int       # its row in its split's features


def class_names_of(options, classes):
    """Display names: --category_names, else data_dir/cat_to_name.json, else folder names."""
    path = options.category_names or Path(options.data_dir) / "cat_to_name.json"
    names = load_category_names(path) if options.category_names or Path(path).is_file() else {}
    return display_names(classes, names)


class Studio:
    """The routes' state. dataset: data.split.Dataset as filed (no decision applied);
    features: {split: (features [N, D], ok [N])}; report: the data check's; backbone: the
    models.backbones.Backbone that computed the features."""

    def __init__(self, options, dataset, features, report, backbone):
        self.options, self.dataset, self.features = options, dataset, features
        self.report, self.backbone, self.feature_dim = report, backbone, backbone.feature_dim
        self.save_dir = Path(options.save_dir)
        self.corrections_path = self.save_dir / CORRECTIONS_NAME
        self.classes = list(dataset.class_to_idx)
        self.names = class_names_of(options, self.classes)
        self.photos = []
        for name, split in dataset.splits.items():
            for row, (path, label) in enumerate(zip(split.paths, split.labels)):
                self.photos.append(Photo(len(self.photos), str(path), label, name, row))
        self.by_path = {photo.path: photo.id for photo in self.photos}
        self.moves_log = self.save_dir / MOVES_LOG
        self.applied = False

    @cached_property
    def by_key(self):
        """{photo_key: id}, made when a decision is first read: a folder opened with none yet
        shows its page without resolving every path."""
        keys = photo_keys([photo.path for photo in self.photos])
        return {key: photo.id for key, photo in zip(keys, self.photos)}

    def photo(self, photo_id):
        """The Photo of an id, 404 when there is none."""
        if not 0 <= photo_id < len(self.photos):
            raise BadRequest(404, f"There is no photo {photo_id}; the studio's photos are "
                             f"numbered 0 to {len(self.photos) - 1}.")
        return self.photos[photo_id]

    def image_path(self, photo_id):
        """The file of a listed photo, only when it is an image file: a link named like a photo
        that leads to anything else (a key, a password file) is 404, never read."""
        photo = self.photo(photo_id)
        target = Path(photo.path).resolve()
        if not (is_image_file(str(target)) and target.is_file()):
            raise BadRequest(404, f"Photo {photo_id} is not an image file in the folder.")
        return target

    def ids_of(self, paths):
        return [self.by_path[path] for path in paths if path in self.by_path]

    def decisions(self):
        """{id: {"label": class or None, "at": time}} of this folder's photos, and how many
        decisions name photos elsewhere."""
        decisions = load_corrections(self.corrections_path)
        mine = {self.by_key[key]: entry for key, entry in decisions.items() if key in self.by_key}
        return mine, len(decisions) - len(mine)

    def decide(self, changes):
        """Record changes ([{"id": N, "label": class or None} or {"id": N, "forget": true}]) in
        corrections.json at once; returns decisions() after them."""
        if not isinstance(changes, list) or not changes or len(changes) > MAX_CHANGES:
            raise BadRequest(400, 'Send {"decisions": [{"id": N, "label": CLASS or null}, ...]} '
                             f"with 1 to {MAX_CHANGES} decisions.")
        parsed = {}
        for change in changes:
            if not isinstance(change, dict) or not isinstance(change.get("id"), int):
                raise BadRequest(400, "Each decision needs an integer \"id\" of a photo.")
            photo = self.photo(change["id"])
            if change.get("forget"):
                parsed[photo.path] = FORGET
            elif "label" not in change or (change["label"] is not None
                                           and change["label"] not in self.classes):
                raise BadRequest(400, f"Decision for photo {photo.id}: \"label\" must be one of "
                                 "the class folder names, or null to drop the photo.")
            else:
                parsed[photo.path] = change["label"]
        try:
            record_decisions(self.corrections_path, parsed)
        except UserError as error:
            raise BadRequest(500, f"The decision was not saved: {error}.") from None
        return self.decisions()

    def apply_to_folders(self):
        """Move the decided photos in the folders (data.reorganise), once per studio start: the
        photo list is the folder as it was; returns how many moved."""
        if self.applied:
            raise BadRequest(409, "The folders were changed already; restart studio.py to see "
                             "them as they are now.")
        moves = plan_moves(self.dataset, load_corrections(self.corrections_path),
                           self.options.data_dir, self.save_dir / SET_ASIDE_FOLDER)
        try:
            moved = apply_moves(moves, self.moves_log)
        except UserError as error:
            raise BadRequest(500, f"{error}.") from None
        self.applied = True
        return moved

    def undo_folders(self):
        """Put back every photo apply_to_folders moved."""
        try:
            back = undo_moves(self.moves_log)
        except UserError as error:
            raise BadRequest(500, f"{error}.") from None
        self.applied = True
        return back

    def class_rows(self):
        """[{folder, name, per-split counts, total}] of the classes as filed."""
        rows = [{"folder": folder, "name": name, "total": 0}
                for folder, name in zip(self.classes, self.names)]
        for photo in self.photos:
            rows[photo.label][photo.split] = rows[photo.label].get(photo.split, 0) + 1
            rows[photo.label]["total"] += 1
        return rows

    def first_pages(self):
        """Photo ids on the first page of each gallery (the findings' and each class's), as the
        page orders them, each once: the thumbnails worth making before anyone asks."""
        findings, ids = self.findings(), []
        for group in (findings["exact_duplicates"] + findings["near_duplicates"])[:GROUPS_SHOWN]:
            ids += group["ids"]
        ids += [item["id"] for item in findings["mislabelled"][:GROUPS_SHOWN]]
        ids += findings["tiny"][:PHOTOS_SHOWN]
        by_class = [[] for _ in self.classes]
        for photo in self.photos:
            if len(by_class[photo.label]) < PHOTOS_SHOWN:
                by_class[photo.label].append(photo.id)
        return list(dict.fromkeys(ids + [i for photos in by_class for i in photos]))

    def findings(self):
        """The data check's findings with photo ids in place of paths."""
        report = self.report
        return {
            "exact_duplicates": [{"ids": self.ids_of(f["path"] for f in group["files"]),
                                  "kinds": group["kinds"]} for group in report["exact_duplicates"]],
            "near_duplicates": [{"ids": self.ids_of(f["path"] for f in pair["files"]),
                                 "kinds": pair["kinds"],
                                 "similarity": pair["pixel_correlation"]}
                                for pair in report["near_duplicates"]],
            "mislabelled": [{"id": self.by_path[item["path"]],
                             "suggested": self.classes.index(item["suggested"]),
                             "probability": item["suggested_probability"],
                             "self_confidence": item["self_confidence"]}
                            for item in report["mislabelled"] if item["path"] in self.by_path],
            "unreadable": self.ids_of(item["path"] for item in report["unreadable"]),
            "tiny": self.ids_of(item["path"] for item in report["tiny"]),
        }

    def state(self):
        """GET /api/state: everything the page draws, photos as [class index, split]."""
        return {"folder": str(self.options.data_dir), "classes": self.class_rows(),
                "splits": list(self.dataset.splits),
                "photos": [[photo.label, photo.split, os.path.basename(photo.path)]
                           for photo in self.photos],  # not Path(): 20x slower at 50,000
                "findings": self.findings(), "corrections": str(self.corrections_path)}


def open_studio(options, device):
    """The Studio of options.data_dir: its split (kept in save_dir like train.py's), the
    backbone's features (from train.py's cache where it has them) and the data check."""
    started = time.perf_counter()
    save_dir = Path(options.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(options.data_dir, options.split, options.split_from,
                           save_dir / MANIFEST_NAME)
    backbone = build_backbone(options.arch)
    if not backbone.pretrained:
        raise UserError(f"--arch {options.arch} has no pretrained features; use --arch "
                        f"{DEFAULT_ARCH}")
    count = sum(len(split.paths) for split in dataset.splits.values())
    extractor = FeatureExtractor(backbone, device, cache_dir=options.cache_dir,
                                 workers=options.workers, images=count)
    features = split_features(extractor, dataset.splits, eval_transform(backbone.preprocess))
    report = check_dataset(dataset.class_to_idx, dataset.splits, features, save_dir,
                           options.cache_dir)
    log(f"{count} photos of {len(dataset.class_to_idx)} classes checked in "
        f"{time.perf_counter() - started:.1f} s")
    return Studio(options, dataset, features, report, backbone)
