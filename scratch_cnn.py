"""A small convolutional network trained from scratch, and its in-memory pipeline for small images.

    python train.py cifar10 --arch cnn          # CIFAR-10's 32x32 photos, trained end to end

On two CPU cores the network is all the machine can afford, so nothing else may take the cores
from it: each image is decoded once into one uint8 tensor in memory (CIFAR-10: 150 MB), and whole
batches are augmented with tensor ops (random crop from a reflect-padded image, horizontal flip)
in the main process, on the device that trains: no decoding workers, no per-image transforms.
"""
import statistics

import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from data_utils import UNREADABLE_IMAGE_ERRORS, load_image

# Widths of the three conv groups and of the stem: about 1.2 M weights, 4.6 MB as float32.
WIDTHS = (64, 128, 256)
STEM_WIDTH = 24
# Input sizes chosen from the data are capped here: the network is made for small images.
MAX_INPUT_SIZE = 64
MEAN, STD = (0.5,) * 3, (0.5,) * 3
CROP_PADDING = 4  # pixels of reflect padding the random training crop may shift into
EVAL_BATCH = 1024


def conv_bn_relu(in_channels, out_channels, pool=False):
    """3x3 conv (then 2x2 max-pooling when pool), BatchNorm, ReLU."""
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers + [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """A 2x2-patch stem, then three groups of conv-pool-BN-ReLU + conv-BN-ReLU, each halving the
    resolution and widening, then global max-pooling: the shape of the fast CIFAR-10 networks
    (airbench, ResNet-9 of DAWNBench). Returns features; the project's head classifies them.

    In eval mode the features are the mean over the image and its mirror image (test-time flip
    averaging), so predict.py and exported models get the same gain as the validation."""

    def __init__(self, widths=WIDTHS, stem_width=STEM_WIDTH):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 2, bias=False),
                                  nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))
        groups, channels = [], stem_width
        for width in widths:
            groups.append(nn.Sequential(*conv_bn_relu(channels, width, pool=True),
                                        *conv_bn_relu(width, width)))
            channels = width
        self.groups = nn.Sequential(*groups)
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.feature_dim = channels

    def features(self, images):
        return self.pool(self.groups(self.stem(images)))

    def forward(self, images):
        if self.training:
            return self.features(images)
        # Two passes rather than one on a doubled batch: torch.export (OpenVINO) then keeps
        # the batch size free.
        return (self.features(images) + self.features(images.flip(3))) / 2


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


def sgd(parameters, learning_rate, weight_decay):
    """SGD with Nesterov momentum and weight decay: the known-good optimiser for small CNNs
    trained from scratch (the trainer adds its warm-up and cosine decay)."""
    return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, nesterov=True,
                           weight_decay=weight_decay)
