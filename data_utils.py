"""The data under the assignment's name: what a course-follower imports to read the data folder
and to turn a photo into the tensor the model takes.

    from data_utils import find_splits, load_image, eval_transform
    class_to_idx, splits = find_splits("flowers")   # {"train": Split, "valid": Split, "test": Split}
    image = load_image("photo.jpg")                  # RGB, EXIF orientation applied
    tensor = eval_transform(backbone.preprocess)(image)

The library itself lives in flower_classifier/data/ (this file only names its public parts).
"""
from flower_classifier.data.class_names import display_names, load_category_names
from flower_classifier.data.folders import find_splits, list_images
from flower_classifier.data.images import load_image
from flower_classifier.data.transforms import augment_transform, eval_transform

__all__ = ["augment_transform", "display_names", "eval_transform", "find_splits", "list_images",
           "load_category_names", "load_image"]
