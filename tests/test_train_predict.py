"""train.py and predict.py end to end on a small real subset of the flowers."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import predict
import train
from conftest import (
    ONE_PASS,
    PROJECT,
    make_subset,
    run_command,
    run_script,
    stopped_at_epoch,
    train_args,
)
from flower_classifier.inference.predictor import Predictor
from flower_classifier.models import engines
from flower_classifier.models.checkpoint import load_checkpoint
from flower_classifier.training import loop, optim, tasks
from flower_classifier.training.config import TrainConfig
from flower_classifier.training.tasks import cached
from flower_classifier.utils.errors import UserError


def test_cli_as_typed_in_the_assignment(subset, tmp_path):
    trained = run_script("train.py", subset, "--save_dir", tmp_path / "run", "--arch",
                         "efficientnet_lite0", "--learning_rate", "0.001", "--hidden_units", "512",
                         "--epochs", "3", "--gpu", "--cache_dir", tmp_path / "cache")
    assert trained.returncode == 0, trained.stderr
    assert sum(line.startswith("epoch") for line in trained.stdout.splitlines()) == 3
    # --gpu uses a CUDA GPU where there is one and says it falls back to the CPU where not.
    assert ("no CUDA GPU found; using the CPU" in trained.stderr) != torch.cuda.is_available()
    image = next((subset / "test" / "10").iterdir())
    predicted = run_script("predict.py", image, tmp_path / "run" / "checkpoint.pth", "--top_k", "5",
                           "--category_names", "cat_to_name.json", "--gpu", "gpu")
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert len(lines) == 4  # the path, then 3 classes: top_k clamped to the class count
    assert "showing all 3" in predicted.stderr
    assert {line.split(". ", 1)[1].rsplit("  ", 1)[0] for line in lines[1:]} == {
        "pink primrose (1)", "globe thistle (10)", "hard-leaved pocket orchid (2)"}


def test_training_learns_and_writes_a_small_safe_checkpoint(trained):
    result, run = trained
    assert result["test_accuracy"] >= 0.8  # chance is 1/3
    assert len(result["history"]) == 8
    checkpoint = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["class_to_idx"] == {"1": 0, "10": 1, "2": 2}
    # The best epoch: the highest valid accuracy, ties to the lower valid loss.
    best = max(result["history"], key=lambda r: (r["valid_accuracy"], -r["valid_loss"]))
    assert checkpoint["epoch"] == best["epoch"] == result["best_epoch"]
    assert checkpoint["metrics"]["valid_accuracy"] == best["valid_accuracy"]
    assert checkpoint["hyperparameters"]["hidden_units"] == 512
    # The backbone comes from its weights; only the stages the default trains are kept.
    assert checkpoint["backbone_state"] is None and checkpoint["stages_state"]
    assert (run / "checkpoint.pth").stat().st_size < 10e6
    for name in ("training_curves.png", "confusion_matrix.png", "test_report.json"):
        assert (run / name).stat().st_size > 0
    report = json.loads((run / "test_report.json").read_text())
    assert report["accuracy"] == pytest.approx(result["test_accuracy"])


def test_predict_returns_sorted_probabilities(trained, subset):
    _, run = trained
    predictor = Predictor(run / "checkpoint.pth")
    correct, images = 0, sorted((subset / "test").glob("*/*"))
    for image in images:
        prediction = predictor.predict_image(image, top_k=5)
        probabilities, classes = prediction.probabilities, prediction.classes
        assert len(classes) == 3 and sorted(classes) == ["1", "10", "2"]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        correct += classes[0] == image.parent.name
    assert correct >= 0.8 * len(images)


def test_predict_folder_json(trained, subset, tmp_path):
    _, run = trained
    (tmp_path / "names.json").write_text(json.dumps({"1": "pink primrose"}))
    shutil.copytree(subset / "test", tmp_path / "photos", symlinks=True)
    (tmp_path / "photos" / "broken.jpg").write_text("not an image")
    result = run_command("predict.py", tmp_path / "photos", run / "checkpoint.pth", "--json",
                         "--top_k", "2", "--category_names", tmp_path / "names.json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(list((subset / "test").glob("*/*")))
    for row in rows:
        assert list(row) == ["path", "classes", "names", "probabilities", "known"]
        assert len(row["classes"]) == 2
        assert row["names"] == ["pink primrose" if c == "1" else c for c in row["classes"]]
    assert "no name for 2 of 3 classes" in result.stderr
    assert "skipped 1 unreadable images" in result.stderr


def test_predict_single_image_json_and_errors(trained, subset, tmp_path):
    _, run = trained
    image = next((subset / "test" / "2").iterdir())
    result = run_command("predict.py", image, run / "checkpoint.pth", "--json")
    assert json.loads(result.stdout)["classes"] == ["2"] and result.stderr == ""
    (tmp_path / "text.jpg").write_text("hello")
    for args, message in [((tmp_path / "nope.jpg", run / "checkpoint.pth"), "not found"),
                          ((tmp_path / "text.jpg", run / "checkpoint.pth"), "cannot read image"),
                          ((image, tmp_path / "missing.pth"), "checkpoint"),
                          ((image, run / "checkpoint.pth", "--category_names", image),
                           "not valid JSON")]:
        result = run_command("predict.py", *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("flags", [
    ["--epochs", "0"], ["--learning_rate", "0"], ["--hidden_units", "-1"], ["--dropout", "1"],
    ["--batch_size", "0"], ["--arch", "resnet9000"], ["--learning_rate", "inf"],
    ["--backbone_lr", "nan"],
])
def test_bad_training_flags(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.get_args_parser().parse_args(["data", *flags])
    assert exit_info.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err


def test_bad_top_k(capsys):
    with pytest.raises(SystemExit):
        predict.get_args_parser().parse_args(["a.jpg", "c.pth", "--top_k", "0"])
    assert "argument --top_k: must be at least 1" in capsys.readouterr().err


def test_unwritable_save_dir_is_found_before_training(subset, tmp_path, monkeypatch):
    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted before --save_dir was checked")

    monkeypatch.setattr(tasks, "extract_features", no_extraction)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot write to --save_dir"):
        train.main(train_args(subset, tmp_path / "a_file" / "run", tmp_path / "cache"))


def test_torchvision_arch_offline_gives_one_clear_line(subset, tmp_path):
    result = run_script("train.py", subset, "--arch", "vgg11", "--save_dir", tmp_path,
                        env={"TORCH_HOME": str(tmp_path / "torch"),
                             "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY":
                             "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "could not get the pretrained weights of vgg11" in result.stderr
    assert "--arch efficientnet_lite0" in result.stderr


def test_feature_cache_hits_and_invalidation(tmp_path):
    data = make_subset(tmp_path / "data", sizes={"train": 4, "valid": 2, "test": 1})
    cache = tmp_path / "cache"

    def run(*extra):
        return train.main(train_args(data, tmp_path / "run", cache, "--epochs", "2", *extra))

    assert run()["extracted_images"] == 12 + 6 + 3
    # Other head hyperparameters: nothing goes through the backbone again.
    assert run("--hidden_units", "0", "--learning_rate", "0.01")["extracted_images"] == 0
    changed = next((data / "train" / "1").iterdir())
    shutil.copy(next((data / "train" / "2").iterdir()), changed.with_name("copy.jpg"))
    changed.unlink()  # the symlink becomes a real file with other content
    shutil.copy(changed.with_name("copy.jpg"), changed)
    assert run()["extracted_images"] == 2  # the changed image and the added copy
    (data / "train" / "1" / "copy.jpg").unlink()
    removed = run()
    assert removed["extracted_images"] == 0
    cache_files = list(cache.glob("*.pt"))
    for cache_file in cache_files:
        cache_file.write_bytes(cache_file.read_bytes()[:1000])  # a damaged cache
    assert run()["extracted_images"] == 12 + 6 + 3


def test_cache_gives_identical_results_and_same_seed_same_weights(subset, tmp_path):
    def head_state(*extra):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        train.main(train_args(subset, run, tmp_path / "cache", "--epochs", "3", *extra))
        return load_checkpoint(run / "checkpoint.pth")["head_state"]

    uncached, cold, warm = head_state("--no_cache"), head_state(), head_state()
    for key in uncached:
        assert torch.equal(uncached[key], cold[key]) and torch.equal(cold[key], warm[key])
    other_seed = head_state("--seed", "1")
    first_weight = next(key for key in warm if key.endswith("weight"))  # the first Linear's
    assert not torch.equal(other_seed[first_weight], warm[first_weight])


def test_augmented_views_are_distinct_and_reproducible(tmp_path):
    subset = make_subset(tmp_path / "data", sizes={"train": 3, "valid": 1, "test": 1})
    result = train.main(train_args(subset, tmp_path / "run", tmp_path / "cache", "--epochs", "2",
                                   "--augment", "2"))
    counts = {split: len(list((subset / split).glob("*/*"))) for split in ("train", "valid", "test")}
    assert result["extracted_images"] == counts["train"] * 3 + counts["valid"] + counts["test"]
    from flower_classifier.data.folders import find_splits
    from flower_classifier.data.transforms import augment_transform
    from flower_classifier.models.backbones import build_backbone
    from flower_classifier.models.features import FeatureExtractor

    backbone = build_backbone("efficientnet_lite0")
    extractor = FeatureExtractor(backbone, torch.device("cpu"), workers=0, engine="torch")
    split = find_splits(subset)[1]["train"]
    views = []
    for view in (1, 2, 1):
        seeds = [cached.view_seed(0, view, path, split.root) for path in split.paths]
        views.append(extractor.features(split.root, split.paths[:4], augment_transform(
            backbone.preprocess), seeds=seeds[:4], view=str(view))[0])
    assert not torch.equal(views[0], views[1])
    assert torch.equal(views[0], views[2])


def test_resume_after_interruption_equals_an_uninterrupted_run(subset, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "SAVE_INTERVAL", 3600)  # the interrupt writes the kept state
    cache = tmp_path / "cache"
    train.main(train_args(subset, tmp_path / "whole", cache, "--epochs", "5"))
    with stopped_at_epoch(4):  # as Ctrl-C would, or a kill after epoch 3's save
        train.main(train_args(subset, tmp_path / "cut", cache, "--epochs", "5"))
    resumed = train.main(train_args(subset, tmp_path / "cut", cache, "--resume",
                                    tmp_path / "cut" / "checkpoint.pth"))
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4, 5]
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pth")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pth")
    assert whole["epoch"] == cut["epoch"]
    for key in whole["head_state"]:
        assert torch.equal(whole["head_state"][key], cut["head_state"][key])
    # The last epoch too, not only the best one, and the losses of the resumed epochs.
    whole_state = load_checkpoint(tmp_path / "whole" / "train_state.pth")
    cut_state = load_checkpoint(tmp_path / "cut" / "train_state.pth")
    for key in whole_state["last_model_state"]:
        assert torch.equal(whole_state["last_model_state"][key], cut_state["last_model_state"][key])
    assert whole_state["history"][3:] == [
        {**record, "seconds": whole_state["history"][3 + i]["seconds"]}
        for i, record in enumerate(cut_state["history"][3:])]
    with pytest.raises(UserError, match="already finished all 5 epochs"):
        train.main(train_args(subset, tmp_path / "cut", cache, "--resume", tmp_path / "cut"))


@pytest.mark.parametrize("interval, writes", [(0, 5), (3600, 1), (None, 1)])
def test_training_writes_at_most_every_save_interval(subset, tmp_path, monkeypatch, interval,
                                                     writes):
    """Fast epochs are written together (after the last one); slow ones each (interval 0).
    None: the default interval, under which epochs of a fraction of a second are written once."""
    if interval is not None:
        monkeypatch.setattr(loop, "SAVE_INTERVAL", interval)
    written = []  # train_state.pth is written through either function
    real_atomic_write, real_save_checkpoint = loop.atomic_write, loop.save_checkpoint

    def atomic_write(path, write):
        written.append(Path(path).name)
        return real_atomic_write(path, write)

    def save_checkpoint(checkpoint, path):
        written.append(Path(path).name)
        return real_save_checkpoint(checkpoint, path)

    monkeypatch.setattr(loop, "atomic_write", atomic_write)
    monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint)
    train.main(train_args(subset, tmp_path / "run", tmp_path / "cache", "--epochs", "5"))
    assert [name for name in written if name == "train_state.pth"] == ["train_state.pth"] * writes
    assert load_checkpoint(tmp_path / "run" / "train_state.pth")["epoch_done"] == 5


def test_an_error_during_training_still_writes_the_finished_epochs(subset, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(loop, "SAVE_INTERVAL", 3600)  # epochs 1-3 are held in memory
    with stopped_at_epoch(4, RuntimeError("a crash in epoch 4")):
        train.main(train_args(subset, tmp_path / "run", tmp_path / "cache", "--epochs", "5"))
    assert load_checkpoint(tmp_path / "run" / "train_state.pth")["epoch_done"] == 3
    assert 1 <= load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] <= 3


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_training_keeps_the_best_head(subset, tmp_path, signum, code):
    log = tmp_path / "log.txt"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "train.py", str(subset), "--save_dir", str(tmp_path / "run"),
             "--cache_dir", str(tmp_path / "cache"), "--epochs", "100000", "--workers", "0",
             *ONE_PASS],
            cwd=PROJECT, stdout=output, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 120
            while not re.search(r"^epoch +2/", log.read_text(), re.M) and time.time() < deadline:
                time.sleep(0.2)
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=60)
        finally:  # a run that ignored the signal must not train on after the test
            process.kill()
            process.wait()
    assert process.returncode == code
    assert "interrupted: the best head so far" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["epoch"] >= 1


def test_unreadable_training_images_are_skipped_or_strict(tmp_path):
    data = make_subset(tmp_path / "data", sizes={"train": 3, "valid": 1})
    (data / "train" / "1" / "zero.jpg").write_bytes(b"")
    (data / "train" / "2" / "text.jpg").write_text("not a jpeg")
    result = run_command("train.py", data, "--save_dir", tmp_path / "run", "--epochs", "1",
                         "--cache_dir", tmp_path / "cache", *ONE_PASS)
    assert result.returncode == 0, result.stderr
    assert "skipped 2 unreadable images" in result.stderr
    strict = run_command("train.py", data, "--save_dir", tmp_path / "strict", "--epochs", "1",
                         "--cache_dir", tmp_path / "cache", "--strict")
    assert strict.returncode == 2 and "2 unreadable images" in strict.stderr
    assert not (tmp_path / "strict" / "checkpoint.pth").exists()


def test_resume_of_a_run_begun_before_the_resize_filter_keeps_resizing_bilinear(
        subset, tmp_path, monkeypatch):
    """A train_state.pth written before checkpoints recorded the filter resumes with that run's
    bilinear resizing, not the backbone's bicubic of today (features of one kind throughout)."""
    monkeypatch.setattr(loop, "SAVE_INTERVAL", 3600)
    with stopped_at_epoch(2):
        train.main(train_args(subset, tmp_path / "run", tmp_path / "cache", "--epochs", "2"))
    state_path = tmp_path / "run" / "train_state.pth"
    state = torch.load(state_path, weights_only=True)
    assert state["preprocess"].pop("interpolation") == "bicubic"
    torch.save(state, state_path)
    resumed = train.main(train_args(subset, tmp_path / "run", tmp_path / "cache", "--resume",
                                    tmp_path / "run"))
    assert resumed["extracted_images"] > 0  # bilinear features: not those cached by epoch 1
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["preprocess"][
        "interpolation"] == "bilinear"
    assert "interpolation=bilinear" in repr(Predictor(tmp_path / "run" / "checkpoint.pth").transform)


def test_training_steps_run_in_bf16_where_the_cpu_computes_it(monkeypatch):
    """train_one_epoch autocasts to bf16 on a CPU with native bf16 (and not elsewhere)."""
    seen = []

    class Recorder(torch.nn.Linear):
        def forward(self, inputs):
            output = super().forward(inputs)
            seen.append(output.dtype)
            return output

    model = Recorder(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = [(torch.randn(2, 4), torch.tensor([0, 2]))]
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(engines, "cpu_has_native_bf16", lambda native=native: native)
        loop.train_one_epoch(model, batches, optimizer, scheduler, scaler,
                                torch.nn.CrossEntropyLoss(), torch.device("cpu"))
        assert seen.pop() == dtype


def test_caches_follow_xdg_cache_home(tmp_path, monkeypatch):
    """Feature and engine caches go under $XDG_CACHE_HOME when set, else ~/.cache."""
    from flower_classifier.models import features

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert features.default_cache_dir() == tmp_path / "flower_classifier" / "features"
    assert engines.default_engine_cache_dir() == tmp_path / "flower_classifier" / "engines"
    assert train.get_args_parser().get_default("cache_dir") == str(features.default_cache_dir())
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert features.default_cache_dir() == Path.home() / ".cache" / "flower_classifier" / "features"


def test_predict_report_scores_a_folder_of_class_folders(trained, subset, tmp_path):
    _, run = trained
    report = predict.main(predict.get_args_parser().parse_args(
        [str(subset / "test"), str(run / "checkpoint.pth"), "--report", str(tmp_path / "report"),
         "--workers", "0"]))
    plain = predict.main(predict.get_args_parser().parse_args(
        [str(subset / "test"), str(run / "checkpoint.pth"), "--no_unknown", "--workers", "0"]))
    right = sum(Path(p.path).parent.name == p.classes[0] for p in plain)
    assert report["images"] == len(plain) == sum(1 for _ in (subset / "test").glob("*/*"))
    assert report["accuracy"] == pytest.approx(right / len(plain))
    assert json.loads((tmp_path / "report" / "test_report.json").read_text()) == report
    assert (tmp_path / "report" / "confusion_matrix.png").stat().st_size > 0
    assert (tmp_path / "report" / "mistakes.png").exists() == (right < len(plain))
    (subset / "test" / "not_a_class").mkdir()
    try:
        with pytest.raises(UserError, match="class folders the checkpoint does not know: "
                                            "not_a_class"):
            predict.main(predict.get_args_parser().parse_args(
                [str(subset / "test"), str(run / "checkpoint.pth"), "--report",
                 str(tmp_path / "report")]))
    finally:
        (subset / "test" / "not_a_class").rmdir()


def test_class_weights():
    labels = [0, 0, 0, 1, 2, 2]
    balanced = optim.class_weights(labels, 4, "balanced")
    assert balanced.tolist() == pytest.approx([2 / 3, 2.0, 1.0, 0.0])
    assert (balanced[torch.tensor(labels)]).mean().item() == pytest.approx(1.0)
    assert optim.class_weights(labels, 3, "none").tolist() == [1.0, 1.0, 1.0]
    sqrt = optim.class_weights(labels, 3, "sqrt")
    assert sqrt[1] / sqrt[0] == pytest.approx(3 ** 0.5)
    assert optim.class_weights(labels, 3, "auto").tolist() == optim.class_weights(
        labels, 3, optim.AUTO_CLASS_WEIGHTS).tolist()


@pytest.mark.parametrize("min_epoch_steps, batch_sizes", [(5, [4] * 5), (0, [4, 4, 2])])
def test_a_small_training_set_is_passed_over_again_until_the_epoch_has_min_epoch_steps(
        min_epoch_steps, batch_sizes):
    """The head alone on 10 rows in batches of 4: with min_epoch_steps 5 an epoch has 5 full
    batches, each pass a shuffle of every row; with 0, one pass as it comes. Each row of the
    epoch draws one of the cached views (here the row's number or its negative)."""
    config = TrainConfig("data", train_stages=0, batch_size=4, min_epoch_steps=min_epoch_steps
                         ).resolved(from_scratch=False)
    rows = torch.arange(10.0).reshape(1, 10, 1) * torch.tensor([1.0, -1.0]).reshape(2, 1, 1)
    inputs = cached.CachedInputs({"train": (rows, torch.arange(10))})
    task = cached.FeatureTask(config, SimpleNamespace(head=torch.nn.Identity()),
                              torch.device("cpu"), inputs)
    torch.manual_seed(0)
    batches = list(task.train_batches(1))
    assert [len(labels) for _, labels in batches] == batch_sizes
    assert task.steps_per_epoch() == len(batch_sizes)
    seen = torch.cat([labels for _, labels in batches])
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert all(torch.equal(inputs[:, 0].abs().long(), labels) for inputs, labels in batches)
    signs = torch.cat([inputs[:, 0] for inputs, _ in batches]).sign()
    assert 0 < int((signs < 0).sum()) < len(signs)  # both views drawn
    if min_epoch_steps:
        assert len(set(seen[10:].tolist())) == 10 and not torch.equal(seen[:10], seen[10:])


def test_training_on_cached_features_takes_at_least_40_steps_an_epoch_by_default():
    assert [TrainConfig("data", **flags).resolved(from_scratch=scratch).min_epoch_steps
            for flags, scratch in [({"train_stages": 0}, False), ({"train_stages": 2}, False),
                                   ({"finetune": True}, False), ({}, True)]] == [40, 40, 0, 0]


@pytest.mark.parametrize("flags, pretrained, warned", [
    ({"finetune": True, "min_epoch_steps": 5}, True, "ignored with --finetune"),
    ({"finetune": True}, True, None),
    ({"arch": "cnn", "min_epoch_steps": 5}, False, "ignored with --arch cnn"),
    ({"arch": "cnn"}, False, None)])
def test_min_epoch_steps_given_where_images_train_on_the_fly_is_a_warning(
        flags, pretrained, warned, monkeypatch, capsys):
    """--finetune and --arch cnn train on images, one pass an epoch: a --min_epoch_steps given
    is ignored with one warning; their own default (0) warns nothing."""
    monkeypatch.setattr(tasks, "ImageTask", lambda *args: "images")
    monkeypatch.setattr(tasks, "ScratchTask", lambda *args: "scratch")
    config = TrainConfig("data", **flags).resolved(from_scratch=not pretrained)
    classifier = SimpleNamespace(backbone_spec=SimpleNamespace(pretrained=pretrained))
    assert tasks.make_task(config, classifier, {}, torch.device("cpu")) in ("images", "scratch")
    errors = capsys.readouterr().err
    assert (f"--min_epoch_steps is {warned}" in errors and errors.count("\n") == 1
            ) if warned else errors == ""


def test_predict_report_on_unreadable_images_is_one_clear_error(trained, tmp_path):
    _, run = trained
    (tmp_path / "labelled" / "1").mkdir(parents=True)
    (tmp_path / "labelled" / "1" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="none of the 1 images .* could be read"):
        predict.main(predict.get_args_parser().parse_args(
            [str(tmp_path / "labelled"), str(run / "checkpoint.pth"), "--report",
             str(tmp_path / "report"), "--workers", "0"]))
