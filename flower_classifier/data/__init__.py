"""Files on disk to tensors: image decoding, transforms, class folders, the automatic split,
loaders, class names and the Oxford-102 download."""
