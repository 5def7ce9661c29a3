"""A small convolutional network trained from scratch, for small images such as CIFAR-10's.

    python train.py cifar10 --arch cnn          # CIFAR-10's 32x32 photos, trained end to end

Its images are decoded once into memory and augmented a whole batch at a time
(data/small_images.py).
"""
import torch
from torch import nn

# Widths of the three conv groups and of the stem: about 1.2 M weights, 4.6 MB as float32.
WIDTHS = (64, 128, 256)
STEM_WIDTH = 24
MEAN, STD = (0.5,) * 3, (0.5,) * 3
EVAL_BATCH = 1024
# The stem's whitening: how many training images its patches come from, and what is added to
# each variance before its square root (the noise directions are not blown up).
WHITENING_IMAGES = 5000
WHITENING_EPS = 5e-4


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

    def whiten_stem(self, images):
        """The stem's filters set to whiten the 2x2 patches of images (normalised, [N, 3, H, W])
        and frozen: the network starts on decorrelated pixels (airbench's whitening layer), and
        the stem's gradient is never computed."""
        conv = self.stem[0]
        filters = whitening_filters(images, conv.kernel_size[0])
        if filters.shape != conv.weight.shape:
            raise ValueError(f"a whitening stem needs {len(filters)} filters, not "
                             f"{conv.out_channels}")
        with torch.no_grad():
            conv.weight.copy_(filters)
        conv.weight.requires_grad_(False)

    def features(self, images):
        return self.pool(self.groups(self.stem(images)))

    def forward(self, images):
        if self.training:
            return self.features(images)
        # Two passes rather than one on a doubled batch: torch.export (OpenVINO) then keeps
        # the batch size free.
        return (self.features(images) + self.features(images.flip(3))) / 2


def whitening_filters(images, kernel_size, eps=WHITENING_EPS):
    """Filters [2 * C * k * k, C, k, k] that whiten the k x k patches of images [N, C, H, W]:
    the eigenvectors of the patches' covariance, largest eigenvalue first, each divided by the
    square root of its eigenvalue (plus eps), then the same filters negated, so that the ReLU
    after them keeps both signs."""
    channels = images.shape[1]
    patches = images.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)  # N C H' W' k k
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * kernel_size ** 2).double()
    centred = patches - patches.mean(0)
    variances, directions = torch.linalg.eigh(centred.T @ centred / len(centred))  # ascending
    filters = (directions / (variances + eps).sqrt()).T.flip(0)
    filters = filters.reshape(-1, channels, kernel_size, kernel_size).float()
    return torch.cat([filters, -filters])


def sgd(parameters, learning_rate, weight_decay):
    """SGD with Nesterov momentum and weight decay: the known-good optimiser for small CNNs
    trained from scratch (the trainer adds its warm-up and cosine decay)."""
    return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, nesterov=True,
                           weight_decay=weight_decay)
