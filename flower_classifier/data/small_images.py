"""Small images (CIFAR-10's 32x32) held in memory and augmented a whole batch at a time.

    size = input_size(paths)                      # 32 for CIFAR-10
    images, ok = decode_images(paths, size)       # uint8 [N, 3, size, size]
    batch = normalize(augment_batch(images[:512]), MEAN, STD)

On two CPU cores the network trained from scratch (models/scratch_cnn.py) is all the machine can
afford, so nothing else may take the cores from it: each image is decoded once into one uint8
tensor in memory (CIFAR-10: 150 MB), and whole batches are augmented with tensor ops (random crop
from a reflect-padded image, horizontal flip) in the main process, on the device that trains: no
decoding workers, no per-image transforms.
"""
import statistics

import torch
from PIL import Image
from torchvision import transforms

from flower_classifier.data.images import UNREADABLE_IMAGE_ERRORS, load_image

# Input sizes chosen from the data are capped here: the network is made for small images.
MAX_INPUT_SIZE = 64
CROP_PADDING = 2  # pixels of reflect padding the random training crop may shift into


def input_size(paths, sample=200):
    """The image side the network sees: the median shorter side of a spread sample of the
    training images (32 for CIFAR-10), at most MAX_INPUT_SIZE, at least 8."""
    step = max(1, len(paths) // sample)
    sides = []
    for path in paths[::step]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except UNREADABLE_IMAGE_ERRORS:
            continue
    return max(8, min(MAX_INPUT_SIZE, int(statistics.median(sides)))) if sides else 32


def decode_images(paths, size):
    """(uint8 images [N, 3, size, size], bool ok [N]): each image read once the way predict.py
    reads it (load_image, then resize and centre crop to size); unreadable ones are zeros."""
    to_tensor = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                    transforms.PILToTensor()])
    images = torch.zeros(len(paths), 3, size, size, dtype=torch.uint8)
    ok = torch.zeros(len(paths), dtype=torch.bool)
    for index, path in enumerate(paths):
        try:
            images[index] = to_tensor(load_image(path))
        except UNREADABLE_IMAGE_ERRORS:
            continue
        ok[index] = True
    return images, ok


def reflect(index, size):
    """Indices outside 0..size-1 mirrored back inside, as reflect padding does."""
    return (size - 1) - ((size - 1) - index.abs()).abs()


def augment_batch(images, padding=CROP_PADDING):
    """Each image of a uint8 batch [N, C, H, W] shifted by up to padding pixels (what a random
    crop of the reflect-padded image gives) and mirrored with probability 1/2: one gather for the
    whole batch. The result is channels-last."""
    count, _, height, width = images.shape
    device = images.device
    shift_y = torch.randint(-padding, padding + 1, (count, 1), device=device)
    shift_x = torch.randint(-padding, padding + 1, (count, 1), device=device)
    mirror = torch.rand(count, 1, device=device) < 0.5
    columns = torch.arange(width, device=device).expand(count, width)
    columns = torch.where(mirror, width - 1 - columns, columns)
    rows = reflect(torch.arange(height, device=device) + shift_y, height)
    columns = reflect(columns + shift_x, width)
    batch = torch.arange(count, device=device)[:, None, None]
    # Advanced indices around a slice put their dimensions first: [N, H, W, C].
    return images[batch, :, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2)


def normalize(images, mean, std):
    """uint8 images to float, normalised as eval_transform does (ToTensor, Normalize)."""
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return ((images.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
