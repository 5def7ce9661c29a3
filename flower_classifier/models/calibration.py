"""How far to trust a prediction: is the photo one of the known classes at all, and are the
probabilities honest?

A softmax always names some class, so a photo of cardboard can come back "rose 80%". The
backbone's features tell better: a photo of a known class lies close (cosine similarity) to that
class's mean training feature, a photo of none of them lies far from all. train.py stores the
class means and the similarity threshold that lets a chosen share of the valid images through.
Temperature scaling (one scalar fitted on valid) makes the probabilities match the accuracy.

    means = class_means(train_features, train_labels, class_count)
    threshold = pass_threshold(nearest_similarity(valid_features, means), pass_rate=0.95)
    known = nearest_similarity(features, means) >= threshold
    temperature = fit_temperature(valid_logits, valid_labels)   # predict: softmax(logits / T)
"""
import math

import torch
from torch import nn

DEFAULT_PASS_RATE = 0.95  # share of valid images the unknown threshold lets through
# Where the fitted temperature is kept: on a small valid split that the head gets all right,
# the NLL keeps falling as T shrinks, which would make every probability 100%.
TEMPERATURE_RANGE = (0.25, 10.0)
ECE_BINS = 15


def class_means(features, labels, class_count):
    """Each class's mean feature, L2-normalised: [C, D] float32."""
    sums = torch.zeros(class_count, features.shape[1]).index_add_(0, labels, features.float())
    return nn.functional.normalize(sums, dim=1)


def nearest_similarity(features, means):
    """Cosine similarity of each feature [N, D] to its nearest class mean [C, D]: [N]."""
    unit = nn.functional.normalize(features.float(), dim=1)
    return (unit @ means.float().T).max(dim=1).values


def pass_threshold(similarities, pass_rate=DEFAULT_PASS_RATE):
    """The similarity that lets pass_rate of these (known-class) images through."""
    return torch.quantile(similarities.float(), 1 - pass_rate).item()


def fit_temperature(logits, labels):
    """The T minimising the NLL of softmax(logits / T) (LBFGS on log T), within
    TEMPERATURE_RANGE."""
    logits, labels = logits.detach().float().clone(), labels.detach().clone()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)
    # Clamped inside the loss too: where every valid image is right, LBFGS's steps grow as the
    # gradient fades and once drove T to 0 (logits / T = inf, a NaN temperature).
    low, high = (math.log(bound) for bound in TEMPERATURE_RANGE)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.clamp(low, high).exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = log_t.exp().item()
    if math.isnan(temperature):  # NaN logits: nothing to fit
        return 1.0
    return min(max(temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
    """ECE: |accuracy - confidence| in each of `bins` equal confidence bins, weighted by the
    share of images in the bin (0 is perfectly calibrated)."""
    confidence, predicted = probabilities.float().max(dim=1)
    correct = (predicted == labels).float()
    bin_of = (confidence * bins).ceil().clamp(1, bins).long() - 1
    error = 0.0
    for index in bin_of.unique():
        inside = bin_of == index
        error += inside.float().mean().item() * abs(correct[inside].mean().item()
                                                    - confidence[inside].mean().item())
    return error
