"""Where the model looked: Grad-CAM on the last convolutional stage of the backbone.

    from flower_classifier.models.explain import explain_image
    explanation = explain_image(predictor.model, predictor.transform, load_image("rose.jpg"))
    explanation.heatmap        # [H, W] in [0, 1] over the centre crop the model saw
    explanation.overlay()      # that crop with the heatmap laid over it (a PIL image)

Grad-CAM (Selvaraju et al., 2017): the gradient of the predicted class's score with respect to
the last stage's activation maps, averaged over each map, weighs the maps; their positive sum,
scaled to the crop, is the heatmap. The classifier's features are the image's alone here (no
mirror average), as the maps are the image's.
"""
import copy
import io
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from flower_classifier.data.images import load_image
from flower_classifier.data.transforms import eval_transform

OVERLAY_ALPHA = 0.5


@dataclass
class Explanation:
    crop: Image.Image        # the centre crop the model saw
    heatmap: np.ndarray      # [H, W] float in [0, 1], the crop's size
    class_index: int
    probability: float

    def overlay(self, alpha=OVERLAY_ALPHA):
        """The crop with the heatmap over it (blue little, red much)."""
        return overlay(self.crop, self.heatmap, alpha)


def colour_map(values):
    """[H, W] in [0, 1] -> [H, W, 3] uint8, a blue-green-yellow-red ramp (no matplotlib)."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 200, 100], [255, 220, 0], [220, 0, 0]],
                     dtype=float)
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    fraction = (position - low)[..., None]
    return (stops[low] * (1 - fraction) + stops[low + 1] * fraction).astype(np.uint8)


def overlay(crop, heatmap, alpha=OVERLAY_ALPHA):
    pixels = np.asarray(crop.convert("RGB"), dtype=float)
    mixed = pixels * (1 - alpha) + colour_map(heatmap).astype(float) * alpha
    return Image.fromarray(mixed.clip(0, 255).astype(np.uint8))


def tensor_to_crop(tensor, preprocess):
    """The normalised image tensor [3, H, W] back to the RGB crop it was made from."""
    mean = torch.tensor(preprocess.mean)[:, None, None]
    std = torch.tensor(preprocess.std)[:, None, None]
    pixels = ((tensor * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def autograd_ready(classifier):
    """classifier, or a copy of it with ordinary tensors where it was built in inference mode
    (as Predictor builds its model on first use), whose tensors autograd cannot use."""
    tensors = itertools.chain(classifier.parameters(), classifier.buffers())
    return copy.deepcopy(classifier) if any(t.is_inference() for t in tensors) else classifier


def explainable(classifier):
    """Whether Grad-CAM can weigh the maps of the backbone's last stage: a pretrained backbone's
    stages are lists of layers; the CNN trained from scratch is one stage, the whole network,
    whose output is its pooled features, not maps."""
    return isinstance(classifier.backbone_spec.stages()[-1], torch.nn.ModuleList)


def grad_cam(classifier, tensor, class_index=None):
    """(heatmap [H, W] in [0, 1], class index, its probability) of a normalised image tensor
    [3, H, W] through an ImageClassifier: Grad-CAM on its backbone's last stage."""
    classifier = autograd_ready(classifier)
    stage = classifier.backbone_spec.stages()[-1][-1]  # a stage is a ModuleList: its last layer
    kept = {}

    def keep(module, inputs, output):
        output.retain_grad()
        kept["maps"] = output

    device = next(classifier.head.parameters()).device
    images = tensor[None].to(device).requires_grad_(True)  # so the frozen maps keep a graph
    classifier.eval()
    handle = stage.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = classifier.head(classifier.backbone(images)).float()
            probabilities = logits.softmax(1)[0]
            index = int(probabilities.argmax()) if class_index is None else class_index
            logits[0, index].backward()
    finally:
        handle.remove()
    maps, gradients = kept["maps"].detach()[0].float(), kept["maps"].grad[0].float()
    cam = torch.relu((gradients.mean((1, 2))[:, None, None] * maps).sum(0))
    cam = torch.nn.functional.interpolate(cam[None, None], size=tensor.shape[1:],
                                          mode="bilinear", align_corners=False)[0, 0]
    top = cam.max()
    heatmap = (cam / top if top > 0 else cam).cpu().numpy()
    return heatmap, index, probabilities[index].item()


def explain_image(classifier, transform, image, class_index=None):
    """The Explanation of a PIL image's prediction (or of class_index) by classifier, the
    image prepared by transform (the checkpoint's eval transform)."""
    tensor = transform(image)
    heatmap, index, probability = grad_cam(classifier, tensor, class_index)
    return Explanation(tensor_to_crop(tensor, classifier.backbone_spec.preprocess), heatmap,
                       index, probability)


def heatmap_overlay_png(classifier, path, names):
    """PNG bytes of the photo at path's crop with its heatmap over it, and the predicted name
    and probability written on it."""
    from PIL import ImageDraw

    transform = eval_transform(classifier.backbone_spec.preprocess)
    explanation = explain_image(classifier, transform, load_image(path, transform_side(classifier)))
    picture = explanation.overlay()
    ImageDraw.Draw(picture).text(
        (4, 4), f"{names[explanation.class_index]} {explanation.probability:.0%}",
        fill=(255, 255, 255))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def heatmap_drawer(classifier, names):
    """heatmap(path) -> heatmap_overlay_png's PNG, for the mistakes page; None where the
    classifier has no maps to weigh. The classifier is made autograd-ready once, not per photo."""
    if not explainable(classifier):
        return None
    classifier = autograd_ready(classifier)
    return lambda path: heatmap_overlay_png(classifier, path, names)


def transform_side(classifier):
    return classifier.backbone_spec.preprocess.resize
