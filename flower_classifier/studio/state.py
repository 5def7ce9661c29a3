"""What the studio holds: the folder's photos (each known by its id, an index into one list),
their features, the data check's findings, and the decisions in corrections.json; with
--unlabelled, new photos too (split NEW, no class yet), which a label adds to train/.

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
from flower_classifier.data.folders import iter_images
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
from flower_classifier.studio.thumbnails import THUMBNAILS_FOLDER, CheckThumbnails
from flower_classifier.utils.console import log
from flower_classifier.utils.errors import UserError

MAX_CHANGES = 10_000  # decisions in one request
SET_ASIDE_FOLDER = "set_aside"  # where applying to the folders moves dropped photos
MOVES_LOG = "moves.jsonl"
# A gallery's page on the studio's page (studio.js SHOWN, and SHOWN / 4 for groups).
PHOTOS_SHOWN, GROUPS_SHOWN = 120, 30
NEW = "new"  # the split of the --unlabelled photos: in no split of the data folder


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
    unlabelled: str | None = None  # a folder of new photos to label with the model's help
    train_flags: tuple = ()  # train.py flags of the final model (studio.py --train_flags)


@dataclass
class Photo:
    id: int
    path: str      # as the folder listing gave it (below the data folder)
    label: int     # the class it is filed under (None for a new photo)
    split: str     # train, valid, test, or NEW
    row: int       # its row in its split's features


def class_names_of(options, classes):
    """Display names: --category_names, else data_dir/cat_to_name.json, else folder names."""
    path = options.category_names or Path(options.data_dir) / "cat_to_name.json"
    names = load_category_names(path) if options.category_names or Path(path).is_file() else {}
    return display_names(classes, names)


class Studio:
    """The routes' state. dataset: data.split.Dataset as filed (no decision applied);
    features: {split: (features [N, D], ok [N])}, NEW's too; report: the data check's;
    backbone: the models.backbones.Backbone that computed the features; new_paths: the
    photos of the --unlabelled folder, in the order of features[NEW]'s rows; thumbnailed: the
    paths whose thumbnails the data check made (or found), which the warmer need not look at."""

    def __init__(self, options, dataset, features, report, backbone, new_paths=(),
                 thumbnailed=frozenset()):
        self.options, self.dataset, self.features = options, dataset, features
        self.thumbnailed = thumbnailed
        self.report, self.backbone, self.feature_dim = report, backbone, backbone.feature_dim
        self.save_dir = Path(options.save_dir)
        self.corrections_path = self.save_dir / CORRECTIONS_NAME
        self.classes = list(dataset.class_to_idx)
        self.names = class_names_of(options, self.classes)
        self.photos = []
        for name, split in dataset.splits.items():
            for row, (path, label) in enumerate(zip(split.paths, split.labels)):
                self.photos.append(Photo(len(self.photos), str(path), label, name, row))
        self.new_ids = self.add_new_photos(new_paths)
        self.by_path = {photo.path: photo.id for photo in self.photos}
        self.moves_log = self.save_dir / MOVES_LOG
        self.applied = False

    @cached_property
    def by_key(self):
        """{photo_key: id}, made when a decision is first read: a folder opened with none yet
        shows its page without resolving every path (with new photos, made as they are
        listed)."""
        keys = photo_keys([photo.path for photo in self.photos])
        return {key: photo.id for key, photo in zip(keys, self.photos)}

    def add_new_photos(self, new_paths):
        """Append the --unlabelled photos as Photos of split NEW; returns their ids. Each file
        comes once, and none that is a filed photo (a link to one stays filed). Their keys are
        resolved here, so by_key is made now, the filed photos' too."""
        start = len(self.photos)
        if not new_paths:
            return range(start, start)
        self.by_key = dict(zip(photo_keys(photo.path for photo in self.photos), range(start)))
        kept = {}
        for row, (path, key) in enumerate(zip(map(str, new_paths), photo_keys(new_paths))):
            if key not in self.by_key:
                kept.setdefault(key, (row, path))
        for key, (row, path) in kept.items():
            self.by_key[key] = len(self.photos)
            self.photos.append(Photo(len(self.photos), path, None, NEW, row))
        return range(start, len(self.photos))

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

    def photos_of(self, paths):
        """The Photo of each path as listed, or as a corrections key (resolved), else None."""
        found = []
        for path in map(str, paths):
            photo_id = self.by_path.get(path)
            found.append(self.photos[photo_id] if photo_id is not None else (
                self.photos[self.by_key[path]] if path in self.by_key else None))
        return found

    def readable_new(self):
        """The ids of the new photos whose features were computed (the others are unreadable)."""
        if not self.new_ids:
            return []
        ok = self.features[NEW][1]
        return [photo_id for photo_id in self.new_ids if ok[self.photos[photo_id].row]]

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
        parsed, added_to = {}, {}
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
            if photo.split == NEW:
                added_to[photo.path] = "train"
        try:
            record_decisions(self.corrections_path, parsed, added_to=added_to)
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
        for photo in self.photos[:self.new_ids.start]:
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
        for photo in self.photos[:self.new_ids.start]:
            if len(by_class[photo.label]) < PHOTOS_SHOWN:
                by_class[photo.label].append(photo.id)
        return list(dict.fromkeys(ids + [i for photos in by_class for i in photos]))

    def thumbnail_order(self):
        """Every photo id once: first_pages(), then the other filed photos class by class (as
        Browse pages through them), then the new photos. The order the warmer makes their
        thumbnails in: the pages looked at first are on disk first, and in time all are."""
        filed = sorted(range(self.new_ids.start), key=lambda i: self.photos[i].label)
        return list(dict.fromkeys(self.first_pages() + filed + list(self.new_ids)))

    def thumbnails_to_make(self):
        """thumbnail_order() without the photos whose thumbnails the data check made."""
        return [i for i in self.thumbnail_order() if self.photos[i].path not in self.thumbnailed]

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
                "findings": self.findings(), "corrections": str(self.corrections_path),
                "unlabelled": self.options.unlabelled}


def open_studio(options, device):
    """The Studio of options.data_dir: its split (kept in save_dir like train.py's), the
    backbone's features (from train.py's cache where it has them) and the data check."""
    started = time.perf_counter()
    new_paths = unlabelled_photos(options)
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
    transform = eval_transform(backbone.preprocess)
    features = split_features(extractor, dataset.splits, transform)
    views = CheckThumbnails(save_dir / THUMBNAILS_FOLDER)
    report = check_dataset(dataset.class_to_idx, dataset.splits, features, save_dir,
                           options.cache_dir, views=views)
    log(f"{count} photos of {len(dataset.class_to_idx)} classes checked in "
        f"{time.perf_counter() - started:.1f} s")
    if new_paths:  # as train.py extracts train/ (no mirror): a label adds them there
        features[NEW] = extractor.features(options.unlabelled, new_paths, transform,
                                           description="new photos")
        log(f"{len(new_paths)} new photos in {options.unlabelled}")
    return Studio(options, dataset, features, report, backbone, new_paths, views.kept)


def unlabelled_photos(options):
    """The image files below --unlabelled ([] without it); a folder inside the data folder (or
    holding it) would list photos twice, one holding the save folder its thumbnails, and one
    without images has nothing to label."""
    if options.unlabelled is None:
        return []
    folder, data = Path(options.unlabelled).resolve(), Path(options.data_dir).resolve()
    if not folder.is_dir():
        raise UserError(f"--unlabelled {options.unlabelled} is not a folder; pass the folder "
                        "of new photos")
    if folder.is_relative_to(data) or data.is_relative_to(folder):
        raise UserError(f"--unlabelled {options.unlabelled} overlaps the data folder "
                        f"{options.data_dir}; pass a folder of new photos beside it")
    if Path(options.save_dir).resolve().is_relative_to(folder):
        raise UserError(f"--unlabelled {options.unlabelled} holds the save folder "
                        f"{options.save_dir}; pass --save_dir outside it")
    paths = [str(path) for path in iter_images(folder)]
    if not paths:
        raise UserError(f"--unlabelled {options.unlabelled} holds no images; pass a folder "
                        "with JPEG or PNG files")
    return paths
