"""The registry's DINOv2 entry (timm's weights): built offline with random weights, and the
clear error where its pretrained weights cannot be downloaded."""
import torch

from conftest import run_script
from flower_classifier.models.backbones import arch_choices, build_backbone, state_sha256


def test_dinov2_builds_with_its_preprocessing_and_class_token_features():
    backbone = build_backbone("dinov2_vits14", pretrained=False)
    assert "dinov2_vits14" in arch_choices()
    assert backbone.feature_dim == 384
    assert (backbone.preprocess.crop, backbone.preprocess.interpolation) == (224, "bicubic")
    assert backbone.preprocess.mean == (0.485, 0.456, 0.406)  # ImageNet's, as it was trained
    with torch.no_grad():
        assert backbone.model(torch.randn(2, 3, 224, 224)).shape == (2, 384)
    assert backbone.weights["sha256"] is None
    assert not any(p.requires_grad for p in backbone.model.parameters())  # frozen


def test_dinov2_offline_is_one_clear_error(subset, tmp_path):
    run = run_script("train.py", subset, "--arch", "dinov2_vits14", "--save_dir", tmp_path,
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert run.returncode == 2
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: could not get the pretrained weights vit_small_patch14_dinov2.lvd142m")
    assert "connect to the internet once" in lines[0]
    assert "--arch efficientnet_lite0" in lines[0]  # the offline alternative


def test_the_weights_hash_tells_changed_weights_apart():
    state = {"weight": torch.zeros(3)}
    before = state_sha256(state)
    state["weight"][1] = 1
    assert state_sha256(state) != before
