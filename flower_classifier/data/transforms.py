"""The backbone's view of a photo: the evaluation transform, its geometry alone, augmentation.

    from flower_classifier.data.transforms import eval_transform
    tensor = eval_transform(backbone.preprocess)(image)   # [3, crop, crop], normalised
"""
from torchvision import transforms


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
