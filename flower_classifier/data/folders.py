"""Class folders: the train/valid/test layout, and every image below a folder.

    from flower_classifier.data.folders import find_splits
    class_to_idx, splits = find_splits("flowers")   # {"train": Split, "valid": Split[, "test"]}
"""
import os
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import make_dataset

from flower_classifier.data.images import IMAGE_EXTENSIONS, is_image_file
from flower_classifier.utils.errors import UserError, error_reason


@dataclass
class Split:
    """The images of one split folder, labelled through the train split's class mapping."""
    root: Path
    paths: list
    labels: list


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
