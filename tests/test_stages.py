"""--train_stages: the backbone's last stages trained with the head on cached activations, on a
small real subset of the flowers; the checkpoint, predictions and the unknown verdict."""
import json
import re

import pytest
import torch

import train
from conftest import run_command, stopped_at_epoch, train_args
from flower_classifier.data.loading import ImageFiles
from flower_classifier.data.transforms import eval_transform
from flower_classifier.datacheck.report import REPORT_NAME
from flower_classifier.inference.predictor import Predictor
from flower_classifier.models.backbones import DEFAULT_ARCH, DEFAULT_TRAIN_STAGES, build_backbone
from flower_classifier.models.calibration import class_means
from flower_classifier.models.checkpoint import load_checkpoint, model_from_checkpoint
from flower_classifier.models.classifier import ImageClassifier, backbone_features, build_head
from flower_classifier.models.stages import (
    FoldedBatchNormAct2d,
    check_train_stages,
    fold_batch_norms,
    split_backbone,
)
from flower_classifier.training import loop
from flower_classifier.training.config import TrainConfig, saved_hyperparameters
from flower_classifier.training.tasks import cached
from flower_classifier.utils.errors import UserError

STAGES = 2  # EfficientNet-Lite0's last block (192 -> 320 channels at 7x7) and conv_head + bn2


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0")


@pytest.mark.parametrize("layers", [1, STAGES, 5])
def test_the_cut_backbone_computes_the_whole_backbones_features(lite0, layers):
    bottom, top = split_backbone(lite0, layers)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        activations = bottom(images)
        assert torch.allclose(top.eval()(activations), lite0.model(images), atol=1e-5)
    if layers == STAGES:
        assert activations.shape == (2, 192, 7, 7)


def test_folded_batch_norms_compute_the_same_and_load_into_the_unfolded_backbone():
    backbone = build_backbone(DEFAULT_ARCH)
    _, top = split_backbone(backbone, STAGES)
    activations = torch.randn(3, 192, 7, 7)
    with torch.no_grad():
        expected = top(activations)
        keys = set(backbone.model.state_dict())
        fold_batch_norms(top.requires_grad_(True))
        assert torch.allclose(top(activations), expected, atol=1e-4)
    folded = [module for module in top.modules() if isinstance(module, FoldedBatchNormAct2d)]
    assert len(folded) == 4  # bn1, bn2, bn3 of the block and bn2 after conv_head
    assert not any(norm.weight.requires_grad for norm in folded)
    assert all(norm.bias.requires_grad for norm in folded)
    # Training keeps the pretrained statistics: in training mode too, the same features.
    assert torch.allclose(top.train()(activations), expected, atol=1e-4)
    # The folded weights, keys unchanged, load into a fresh (unfolded) backbone as they are.
    assert set(backbone.model.state_dict()) == keys
    fresh = build_backbone(DEFAULT_ARCH)
    fresh.model.load_state_dict(backbone.model.state_dict())
    with torch.no_grad():
        assert torch.allclose(split_backbone(fresh, STAGES)[1](activations), expected, atol=1e-4)


@pytest.mark.parametrize("fold_norms", [True, False])
def test_the_stage_task_folds_the_batch_norms_unless_told_not_to(fold_norms):
    backbone = build_backbone(DEFAULT_ARCH)
    _, top = split_backbone(backbone, STAGES)
    classifier = ImageClassifier(backbone, build_head(backbone.feature_dim, 3, 16, 0.5, "sqrt"))
    config = TrainConfig("flowers", fold_norms=fold_norms).resolved(False, STAGES)
    task = cached.StageTask(config, classifier, torch.device("cpu"), cached.CachedInputs({}), top)
    folded = [m for m in task.model.top.modules() if isinstance(m, FoldedBatchNormAct2d)]
    assert len(folded) == (4 if fold_norms else 0)


def test_runs_begun_before_the_folding_resume_unfolded():
    assert saved_hyperparameters({})["fold_norms"] is False
    assert TrainConfig("flowers").fold_norms is True


def test_stages_out_of_range_or_a_backbone_that_cannot_be_cut_are_user_errors(lite0):
    with pytest.raises(UserError, match="choose 1 to 8"):
        check_train_stages(lite0, 9)
    with pytest.raises(UserError, match="use --finetune"):
        check_train_stages(build_backbone("dinov2_vits14", pretrained=False), 1)


@pytest.fixture(scope="module")
def stage_run(subset, tmp_path_factory):
    """A real --train_stages run on the subset, through torch (as the Predictor checks it):
    (result, run folder, cache folder)."""
    root = tmp_path_factory.mktemp("stages")
    result = train.main(train_args(subset, root / "run", root / "cache", "--train_stages",
                                   STAGES, "--epochs", "4", "--engine", "torch"))
    return result, root / "run", root / "cache"


def test_the_checkpoint_keeps_only_the_trained_stages(stage_run, lite0):
    result, run, _ = stage_run
    checkpoint = load_checkpoint(run / "checkpoint.pth")
    assert checkpoint["backbone_state"] is None
    assert checkpoint["hyperparameters"]["train_stages"] == STAGES
    stages = checkpoint["stages_state"]
    assert {key.split(".")[0] + ("." + key.split(".")[1] if key.startswith("blocks") else "")
            for key in stages} == {"blocks.6", "conv_head", "bn2"}
    pretrained = lite0.model.state_dict()
    assert not torch.equal(stages["conv_head.weight"], pretrained["conv_head.weight"])  # trained
    assert (run / "checkpoint.pth").stat().st_size < 10e6
    # The rebuilt model: the pretrained backbone with the trained stages on top of it.
    rebuilt = model_from_checkpoint(checkpoint).backbone.state_dict()
    assert torch.equal(rebuilt["conv_head.weight"], stages["conv_head.weight"])
    assert torch.equal(rebuilt["blocks.5.0.conv_pw.weight"], pretrained["blocks.5.0.conv_pw.weight"])


def image_batch(subset, split, preprocess):
    paths = sorted(str(path) for path in (subset / split).glob("*/*"))
    dataset = ImageFiles(paths, eval_transform(preprocess), preprocess.crop)
    return torch.stack([dataset[i][0] for i in range(len(paths))]), paths


def test_predictions_and_the_unknown_verdict_come_from_the_trained_stages(stage_run, subset,
                                                                           lite0):
    result, run, _ = stage_run
    predictor = Predictor(run / "checkpoint.pth", engine="torch")
    valid, paths = image_batch(subset, "valid", predictor.preprocess)
    predictions = predictor.top(predictor.outputs(valid), 1, paths)
    correct = sum(p.classes[0] == p.path.split("/")[-2] for p in predictions)
    assert correct / len(paths) == pytest.approx(result["valid_accuracy"])  # as training saw it
    # The verdict's class means are those of the trained backbone's features of train/ (the
    # images, not their mirror images, as for the head alone), not the pretrained backbone's.
    checkpoint = predictor.checkpoint
    train_images, train_paths = image_batch(subset, "train", predictor.preprocess)
    labels = torch.tensor([checkpoint["class_to_idx"][p.split("/")[-2]] for p in train_paths])
    with torch.no_grad():
        trained = backbone_features(predictor.model.backbone, train_images, False)
        pretrained = backbone_features(lite0.model, train_images, False)
    means = checkpoint["class_means"].float()
    assert torch.allclose(class_means(trained, labels, 3), means, atol=0.005)
    assert not torch.allclose(class_means(pretrained, labels, 3), means, atol=0.02)
    known = [p.known for p in predictions]
    assert sum(known) >= len(known) - 1  # the threshold lets 95% of valid/ through


def test_the_data_check_runs_on_the_pretrained_stages_features(stage_run, subset, lite0):
    _, run, _ = stage_run
    report = json.loads((run / REPORT_NAME).read_text())
    assert report["images"] == sum(1 for _ in subset.glob("*/*/*"))
    # The features it compared: the pretrained stages' on the cached activations, which are
    # the whole pretrained backbone's features.
    task_features = cached.pretrained_top_features(
        split_backbone(lite0, STAGES)[1], {"valid": (bottom_activations(lite0, subset), None)},
        torch.device("cpu"))["valid"][0]
    images, _ = image_batch(subset, "valid", lite0.preprocess)
    with torch.no_grad():
        assert torch.allclose(task_features.float(), lite0.model(images), atol=0.05)


def bottom_activations(backbone, subset):
    """[N, 1, C, H, W] activations of valid/'s images, as the cache keeps them."""
    images, _ = image_batch(subset, "valid", backbone.preprocess)
    with torch.no_grad():
        return split_backbone(backbone, STAGES)[0](images).unsqueeze(1)


@pytest.mark.parametrize("mirror, cached_views", [("predict", 1), ("off", 1), ("all", 2)])
def test_training_views_flip_the_map_or_take_a_cached_view(mirror, cached_views):
    """One cached view: --mirror predict flips each map left to right at random (half of them
    here), --mirror off never; two (--mirror all): each row is one of its two cached views."""
    torch.manual_seed(0)
    rows = torch.randn(400, cached_views, 4, 3, 3)
    task = cached.StageTask.__new__(cached.StageTask)
    task.flip_maps = mirror != "off"
    inputs = task.training_inputs(rows)
    same = torch.tensor([torch.equal(a, b[0]) for a, b in zip(inputs, rows)])
    if cached_views == 2:
        second = torch.tensor([torch.equal(a, b[1]) for a, b in zip(inputs, rows)])
        assert bool((same ^ second).all()) and 150 < int(second.sum()) < 250
        return
    flipped = torch.tensor([torch.equal(a, b[0].flip(-1)) for a, b in zip(inputs, rows)])
    assert bool((same ^ flipped).all())
    assert (150 < int(flipped.sum()) < 250) if mirror == "predict" else not flipped.any()


@pytest.mark.parametrize("flags, stages, epochs, batch_size, learning_rate", [
    ({}, 2, 12, 64, 0.001), ({"train_stages": 0}, 0, 40, 128, 0.002),
    ({"finetune": True}, 0, 50, 64, 0.001)])
def test_each_family_has_its_own_defaults(flags, stages, epochs, batch_size, learning_rate):
    """The default trains Lite0's last two stages; the head alone and --finetune have their own
    defaults."""
    config = TrainConfig("data", **flags).resolved(from_scratch=False,
                                                   default_stages=DEFAULT_TRAIN_STAGES[DEFAULT_ARCH])
    assert (config.train_stages, config.epochs, config.batch_size,
            config.learning_rate) == (stages, epochs, batch_size, learning_rate)
    assert config.backbone_lr == (3e-4 if stages else 1e-4)
    assert TrainConfig("data").resolved(from_scratch=True).train_stages == 0


def test_a_warm_rerun_extracts_nothing(stage_run, subset, tmp_path):
    _, _, cache = stage_run
    rerun = train.main(train_args(subset, tmp_path / "run", cache, "--train_stages", STAGES,
                                  "--epochs", "1", "--engine", "torch"))
    assert rerun["extracted_images"] == 0


def test_a_resumed_stage_run_ends_as_the_whole_run(stage_run, subset, tmp_path, monkeypatch):
    _, whole_run, cache = stage_run
    monkeypatch.setattr(loop, "SAVE_INTERVAL", 3600)
    args = ("--train_stages", STAGES, "--epochs", "4", "--engine", "torch")
    with stopped_at_epoch(3):
        train.main(train_args(subset, tmp_path / "cut", cache, *args))
    train.main(train_args(subset, tmp_path / "cut", cache, "--engine", "torch", "--resume",
                          tmp_path / "cut" / "checkpoint.pth"))
    whole = load_checkpoint(whole_run / "checkpoint.pth")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pth")
    assert whole["epoch"] == cut["epoch"]
    for key in whole["stages_state"]:
        assert torch.equal(whole["stages_state"][key], cut["stages_state"][key]), key


def test_finetune_and_train_stages_together_are_one_clear_error(subset, tmp_path):
    run = run_command("train.py", subset, "--save_dir", tmp_path, "--finetune", "--train_stages",
                      "2", "--cache_dir", tmp_path / "cache")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "error: --finetune trains on images, --train_stages on cached activations; choose one "
        "of them"]


def test_export_of_a_stage_checkpoint_matches_predict(stage_run, subset, tmp_path):
    _, run, _ = stage_run
    exported = run_command("export.py", run / "checkpoint.pth", "--output", tmp_path / "model.pt",
                           "--check", subset / "valid")
    assert exported.returncode == 0, exported.stderr
    check = re.search(r"top-1 class agrees with predict.py on ([\d.]+)%, largest probability "
                      r"difference ([\d.e+-]+)", exported.stdout)
    assert check, exported.stdout
    assert float(check[1]) == 100.0 and float(check[2]) < 1e-3
