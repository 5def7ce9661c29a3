"""The model: backbones, the head and the classifier, the checkpoint's schema, the backbone cut
for trained stages, engines, the feature cache and calibration."""
