"""Folders, transforms and images: everything that turns files on disk into tensors.

    from data_utils import find_splits, load_image, eval_transform
    splits = find_splits("flowers")            # {"train": Split, "valid": Split, "test": Split}
    image = load_image("photo.jpg")            # RGB, EXIF orientation applied
    tensor = eval_transform(backbone.preprocess)(image)

Images are JPEG, PNG, WebP, TIFF (first page), BMP, GIF (first frame), PPM/PGM and the phone
formats HEIC/HEIF (iPhones' default, read through pillow-heif) and AVIF. No other format is ever
opened (EPS would run Ghostscript), and an image's size is checked from its header before any
pixel is decoded, so one function is safe for a training folder and for a server's uploads alike.
"""
import contextlib
import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

from common import UserError, error_reason, warn

try:  # HEIC/HEIF, the format iPhones save by default; Pillow reads AVIF itself
    import pillow_heif
except ImportError:  # optional: without it, .heic files are reported unreadable
    pillow_heif = None
else:
    pillow_heif.register_heif_opener()

IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".heic", ".heif", ".avif")

# What Pillow and pillow-heif raise for files that are not images, are damaged, or are too large
# to decode safely (decoders of damaged files raise more than OSError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
                           KeyError, RuntimeError, Image.DecompressionBombError)
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
# The only decoders ever used (the JPEG one also reads cameras' multi-picture MPO files).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "BMP", "TIFF", "GIF", "PPM")
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own safety limit, about 89 million
# open_image refuses images over MAX_PIXELS itself, so Pillow's warning about the half-way
# region before its own limit would only precede that error.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Longest side over shortest side kept: a longer image is cropped about its centre before it is
# resized (a 4000x1 PNG would otherwise become 1,024,000x256 pixels), which keeps every pixel the
# centre crop of eval_transform uses.
MAX_ASPECT_RATIO = 8


@dataclass
class Split:
    """The images of one split folder, labelled through the train split's class mapping."""
    root: Path
    paths: list
    labels: list


def is_image_file(path):
    """By extension, skipping hidden files such as macOS '._photo.jpg' resource forks."""
    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(
        path, IMAGE_EXTENSIONS)


def class_folders(split_dir):
    """Visible sub-folders (symlinks followed), sorted as names: '1', '10', '100', '2'..."""
    try:
        return sorted(entry.name for entry in os.scandir(split_dir)
                      if entry.is_dir() and not entry.name.startswith("."))
    except OSError as error:
        raise UserError(f"cannot read {split_dir} ({error_reason(error)}); check the "
                        "folder's permissions") from None


def list_split(split_dir, class_to_idx):
    """The split's images labelled through class_to_idx; a class folder it lacks is an error."""
    unknown = sorted(set(class_folders(split_dir)) - set(class_to_idx))
    if unknown:
        raise UserError(f"{split_dir} has class folders that train/ lacks: {', '.join(unknown[:5])}; "
                        "add them to train/ or remove them")
    samples = make_dataset(str(split_dir), class_to_idx, is_valid_file=is_image_file,
                           allow_empty=True)
    return Split(Path(split_dir), [path for path, _ in samples], [label for _, label in samples])


def find_splits(data_dir):
    """train/, valid/ and (when present) test/ of data_dir, all mapped through train's classes."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise UserError(f"data folder {data_dir} does not exist; pass the folder that holds "
                        "train/ and valid/")
    if not data_dir.is_dir():
        raise UserError(f"{data_dir} is a file, not a folder; pass the folder that holds "
                        "train/ and valid/")
    for required in ("train", "valid"):
        if not (data_dir / required).is_dir():
            raise UserError(f"{data_dir} has no {required}/ folder; the data folder needs train/ "
                            "and valid/ (and optionally test/), each with one folder per class")
    classes = class_folders(data_dir / "train")
    if not classes:
        raise UserError(f"{data_dir / 'train'} has no class folders; put each class's images in "
                        "a folder named after the class")
    class_to_idx = {name: index for index, name in enumerate(classes)}
    splits = {name: list_split(data_dir / name, class_to_idx)
              for name in ("train", "valid", "test") if (data_dir / name).is_dir()}
    if "test" in splits and not splits["test"].paths:
        del splits["test"]  # an empty test/ means: no test at the end
    empty = sorted(set(classes) - {classes[label] for label in splits["train"].labels})
    if len(empty) == len(classes):
        raise UserError(f"{data_dir / 'train'} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        raise UserError(f"train/ class folders with no images: {', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''}; add images or remove the folders")
    if not splits["valid"].paths:
        raise UserError(f"{data_dir / 'valid'} holds no images; put a few images per class there")
    return class_to_idx, splits


def list_images(folder):
    """Every image below folder, recursively, sorted by path."""
    return list(iter_images(folder))


def iter_images(folder):
    """list_images() one path at a time, holding only the names of the folders being walked,
    so that a million photos stream. Folder symlinks are not followed; a broken file symlink
    is listed (prediction then reports it unreadable instead of dropping it unseen)."""
    folder = str(Path(folder))
    try:
        with os.scandir(folder) as entries:
            # "name/" for folders: walking in this order gives sorted(full paths) exactly.
            names = sorted(entry.name + "/" if entry.is_dir(follow_symlinks=False)
                           else entry.name for entry in entries
                           if not entry.is_symlink() or not entry.is_dir())
    except OSError as error:
        raise UserError(f"cannot read {folder} ({error_reason(error)}); check the folder's "
                        "permissions") from None
    for name in names:
        if name.endswith("/"):
            yield from iter_images(os.path.join(folder, name[:-1]))
        elif is_image_file(name):
            yield os.path.join(folder, name)


@contextlib.contextmanager
def open_image(path, target=None):
    """The image with only its header read, refused before decoding when it is not one of
    IMAGE_FORMATS or has more than MAX_PIXELS pixels (DecompressionBombError).

    target: the shorter side the transform will resize to. A JPEG is then decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= target: a 12-MP phone photo
    decodes about 7x faster, and the resize that follows sees the same scene.
    """
    with Image.open(path, formats=IMAGE_FORMATS) as image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise Image.DecompressionBombError(
                f"the image is {width}x{height} pixels, more than the {MAX_PIXELS} decoded safely")
        if target:
            image.draft("RGB", (target, target))  # before any pixel is read; not JPEG: no-op
        yield image


def centre_crop_to_aspect(image, max_ratio=MAX_ASPECT_RATIO):
    """The image cropped about its centre so its long side is at most max_ratio x its short one."""
    width, height = image.size
    short = max(1, min(width, height))
    keep_width, keep_height = min(width, short * max_ratio), min(height, short * max_ratio)
    if (keep_width, keep_height) == (width, height):
        return image
    left, top = (width - keep_width) // 2, (height - keep_height) // 2
    return image.crop((left, top, left + keep_width, top + keep_height))


def to_rgb(image):
    """An opened image as a new RGB image the way the camera meant it: EXIF rotation applied (in
    place), an extreme aspect ratio cropped, 16-bit levels scaled by Pillow's lookup tables (no
    float copy), transparency over white. At most two images of its size are held at once."""
    ImageOps.exif_transpose(image, in_place=True)  # a copy only when the photo is rotated
    image = centre_crop_to_aspect(image)
    if image.mode in SIXTEEN_BIT_MODES:
        scale = 257 if image.getextrema()[1] > 255 else 1
        image = image.point(lambda level: level / scale).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")  # a copy even of an RGB image: the opened one is closed after


def load_image(path, target=None):
    """An RGB image the way the camera meant it (open_image, then to_rgb): safe for any file."""
    with open_image(path, target) as image:
        return to_rgb(image)


def resize_and_crop(preprocess):
    """The shorter side resized with the backbone's filter, then the centre crop: the geometry
    of eval_transform, and all an app does to a photo before an exported model (app_model)."""
    return transforms.Compose([
        transforms.Resize(preprocess.resize,
                          interpolation=transforms.InterpolationMode(preprocess.interpolation)),
        transforms.CenterCrop(preprocess.crop),
    ])


def eval_transform(preprocess):
    """Resize, centre crop and normalise as the backbone was trained: the one used to predict."""
    return transforms.Compose([
        resize_and_crop(preprocess),
        transforms.ToTensor(),
        transforms.Normalize(preprocess.mean, preprocess.std),
    ])


def augment_transform(preprocess):
    """Random crop, flip, rotation and colour jitter: views that teach the head what varies."""
    return transforms.Compose([
        transforms.RandomResizedCrop(preprocess.crop, scale=(0.35, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(20),
        transforms.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
        transforms.ToTensor(),
        transforms.Normalize(preprocess.mean, preprocess.std),
    ])


def is_readable(path):
    try:
        load_image(path)
    except UNREADABLE_IMAGE_ERRORS:
        return False
    return True


class ImageFiles(torch.utils.data.Dataset):
    """(image tensor, label, ok) by path, for batched extraction, fine-tuning and prediction.

    An unreadable file yields a zero image and ok=False instead of stopping a run at image 5,000.
    With seeds, image i is transformed under torch.manual_seed(seeds[i]), so a random augmented
    view is the same whatever worker or batch computes it. Without labels, the label is -1.
    """

    def __init__(self, paths, transform, crop, labels=None, seeds=None, draft=None):
        self.paths, self.transform, self.crop = paths, transform, crop
        self.labels, self.seeds, self.draft = labels, seeds, draft

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        label = -1 if self.labels is None else self.labels[index]
        try:
            image = load_image(self.paths[index], self.draft)
        except UNREADABLE_IMAGE_ERRORS:
            return torch.zeros(3, self.crop, self.crop), label, False
        if self.seeds is not None:
            torch.manual_seed(self.seeds[index])
        return self.transform(image), label, True


def load_category_names(path):
    """The JSON mapping of class folder names to display names, checked with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"category names file {path} not found")
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"cannot read {path} ({error_reason(error)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(names, dict):
        raise UserError(f"{path} must hold a JSON object mapping class folder names to names, "
                        'like {"1": "pink primrose"}')
    return {str(key): str(value) for key, value in names.items()}


def display_names(classes, category_names):
    """The display name of each class folder name, the folder name where the mapping has none."""
    return [category_names.get(name, name) for name in classes]


def check_category_names(category_names, classes):
    """Warn when a category names file leaves classes unnamed: a wrong file is a common slip."""
    missing = [name for name in classes if name not in category_names]
    if category_names and missing:
        warn(f"the category names file has no name for {len(missing)} of {len(classes)} classes "
             f"({', '.join(missing[:5])}); showing their folder names")


def default_workers():
    """Decoding processes: one core is left for the model, and a few are plenty."""
    return max(1, min(6, (os.cpu_count() or 2) - 1))


def image_loader(dataset, batch_size, workers, device, shuffle=False, sampler=None):
    """Batches decoded by worker processes, pinned for fast copies to a GPU."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers else None)
