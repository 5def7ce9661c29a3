"""Fine-tuning the backbone, and torchrun with several processes (gloo on the CPU)."""

import torch

import train
from conftest import ONE_PASS, run_script, train_args
from flower_classifier.inference.predictor import Predictor
from flower_classifier.models.backbones import build_backbone
from flower_classifier.models.checkpoint import load_checkpoint


def test_finetune_trains_the_last_stage_and_predicts(subset, tmp_path):
    result = train.main(train_args(subset, tmp_path / "run", tmp_path / "cache", "--finetune",
                                   "--finetune_layers", "1", "--epochs", "2", "--batch_size", "8"))
    assert result["test_accuracy"] >= 0.8
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    tuned = checkpoint["backbone_state"]
    pretrained = build_backbone("efficientnet_lite0").model.state_dict()
    changed = {key.split(".")[0] for key in tuned if not torch.equal(tuned[key], pretrained[key])}
    # Only the last stage (conv_head + bn2 for EfficientNet) moved; BatchNorm stats stay frozen
    # elsewhere because frozen stages run in eval mode.
    assert changed == {"conv_head", "bn2"}
    assert checkpoint["hyperparameters"]["label_smoothing"] == 0.1
    image = next((subset / "test" / "10").iterdir())
    assert Predictor(tmp_path / "run" / "checkpoint.pth").predict_image(image, 1).classes == ["10"]


def test_compiled_finetune_saves_plain_weights(subset, tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def compile_spy(model, *args, **kwargs):
        """torch.compile as train.py calls it, on the aot_eager backend: what is checked here
        (--compile reaches the model, the checkpoint's keys) is the same with any backend, and
        inductor's kernels, compiled on a machine that has none cached, cost most of a minute."""
        compiled.append(type(model).__name__)
        return real_compile(model, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_spy)
    result = train.main(train_args(subset, tmp_path / "run", tmp_path / "cache", "--finetune",
                                   "--finetune_layers", "1", "--epochs", "1", "--batch_size", "8",
                                   "--compile"))
    assert compiled == ["ImageClassifier"]  # --compile was not dropped on the way
    assert result["test_accuracy"] >= 0.6
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    # Keys as the uncompiled model names them, so predict.py loads it without torch.compile.
    plain = build_backbone("efficientnet_lite0").model.state_dict()
    assert checkpoint["backbone_state"].keys() == plain.keys()
    image = next((subset / "test" / "10").iterdir())
    assert Predictor(tmp_path / "run" / "checkpoint.pth").predict_image(image, 1).classes == ["10"]


def test_torchrun_two_processes_match_one(subset, trained, tmp_path):
    """--batch_size is the global batch: two processes take one process's steps, each step on
    half the batch, and score as one process does."""
    one_process, one_run = trained
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
                        subset, "--save_dir", tmp_path / "run", "--cache_dir",
                        tmp_path / "cache", "--epochs", "8", "--workers", "0", *ONE_PASS)
    assert result.returncode == 0, result.stderr[-2000:]
    # Only rank 0 prints and saves.
    assert sum(line.startswith("epoch") for line in result.stdout.splitlines()) == 8
    optional = {"mistakes.png", "mistakes.html", "data_check"}  # mistakes: where there are any
    assert {p.name for p in (tmp_path / "run").iterdir()} - optional == {
        "checkpoint.pth", "confusion_matrix.png", "test_report.json", "train_state.pth",
        "training_curves.png", "data_report.json"}
    accuracy = float(result.stdout.split("test accuracy ")[1].split("%")[0]) / 100
    assert abs(accuracy - one_process["test_accuracy"]) <= 0.01
    steps = [load_checkpoint(run / "train_state.pth")["scheduler_state"]["last_epoch"]
             for run in (one_run, tmp_path / "run")]
    assert steps[0] == steps[1] > 0
    images = sum(1 for _ in subset.glob("*/*/*"))
    assert f"features ready: {images} images" in result.stdout  # each image once, not twice
