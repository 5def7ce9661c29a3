"""Images decoded in worker processes, batched for the model.

    from flower_classifier.data.loading import ImageFiles, image_loader
    loader = image_loader(ImageFiles(paths, transform, crop=224), 64, workers=1, device=device)
"""
import os

import torch

from flower_classifier.data.images import UNREADABLE_IMAGE_ERRORS, load_image


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


def default_workers():
    """Decoding processes: one core is left for the model, and a few are plenty."""
    return max(1, min(6, (os.cpu_count() or 2) - 1))


def image_loader(dataset, batch_size, workers, device, shuffle=False, sampler=None):
    """Batches decoded by worker processes, pinned for fast copies to a GPU."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers else None)
