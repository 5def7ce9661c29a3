"""What a new user trips on (issue 32), as a user meets it: train.py with no --save_dir in a
working folder, check_data.py after it on the same cache, then predict.py, serve.py and the
export's metadata with no --category_names: names given once at training show everywhere, runs
land in runs/train, runs/train2, ..., and the check extracts nothing train.py extracted."""
import json

import pytest

from conftest import ONE_PASS, PROJECT, run_command

NAMES = json.loads((PROJECT / "cat_to_name.json").read_text())


@pytest.fixture(scope="module")
def workdir(subset, tmp_path_factory):
    """A working folder where train.py ran twice without --save_dir (with --category_names):
    (folder, the feature cache, the XDG cache of its converted models). The converted models
    are its own: another test process converting the backbone in the session's folder would
    turn a later small job to OpenVINO, whose features are cached apart."""
    import train

    folder = tmp_path_factory.mktemp("work")
    cache, engines = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("XDG_CACHE_HOME", str(engines))
        for _ in range(2):
            train.main(train.get_args_parser().parse_args(
                [str(subset), "--epochs", "2", "--cache_dir", str(cache), "--workers", "0",
                 "--category_names", str(PROJECT / "cat_to_name.json"), *ONE_PASS]))
    return folder, cache, engines


def test_runs_without_save_dir_go_to_numbered_folders_under_runs(workdir):
    folder, _, _ = workdir
    assert [path.name for path in folder.iterdir()] == ["runs"]
    assert sorted(path.name for path in (folder / "runs").iterdir()) == ["train", "train2"]
    for run in ("train", "train2"):
        assert (folder / "runs" / run / "checkpoint.pth").is_file()
        assert not list((folder / "runs" / run).glob("*.previous.*"))  # each run its own


def test_train_py_prints_where_the_run_goes(subset, tmp_path):
    result = run_command("train.py", subset, "--epochs", "1", "--cache_dir", tmp_path / "cache",
                         "--workers", "0", "--save_dir", tmp_path / "run", *ONE_PASS)
    assert result.returncode == 0, result.stderr
    assert f"this run's files go to {tmp_path / 'run'}/" in result.stdout
    assert result.stdout.rstrip().endswith(f"in {tmp_path / 'run'}/")
    # a fresh cache: every image went through the backbone, and nothing claims otherwise
    assert "images through the backbone, none from the cache" in result.stdout


def test_check_data_after_train_extracts_nothing(workdir, subset, monkeypatch, capsys):
    folder, cache, engines = workdir
    import check_data
    from flower_classifier.models.features import FeatureExtractor

    def must_not_run(*args, **kwargs):
        raise AssertionError("check_data.py extracted features train.py had cached")

    monkeypatch.setattr(FeatureExtractor, "compute", must_not_run)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("XDG_CACHE_HOME", str(engines))
    check_data.main(check_data.get_args_parser().parse_args(
        [str(subset), "--cache_dir", str(cache), "--workers", "0"]))
    out = capsys.readouterr().out
    assert "features ready: 0 images through the backbone, all" in out
    assert "this check's files go to runs/check/" in out
    assert (folder / "runs" / "check" / "data_report.json").is_file()
    assert sorted(path.name for path in folder.iterdir()) == ["runs"]


def test_the_checkpoint_keeps_the_names_and_every_user_of_it_shows_them(workdir, subset):
    from flower_classifier.export.metadata import export_metadata
    from flower_classifier.inference.predictor import Predictor
    from flower_classifier.models.checkpoint import load_checkpoint

    folder, _, _ = workdir
    path = folder / "runs" / "train" / "checkpoint.pth"
    checkpoint = load_checkpoint(path)
    assert checkpoint["class_names"] == {name: NAMES[name] for name in ("1", "10", "2")}
    predictor = Predictor(path)
    assert predictor.names == [NAMES[name] for name in predictor.classes]
    assert Predictor(path, category_names={"1": "mine"}).names == ["mine", "10", "2"]
    assert export_metadata(checkpoint, "onnx")["names"] == predictor.names
    photo = sorted((subset / "test" / "2").iterdir())[0]
    printed = run_command("predict.py", photo, path, "--top_k", "3")
    assert printed.returncode == 0, printed.stderr
    assert NAMES["2"] in printed.stdout and "2: " not in printed.stdout


def test_serve_shows_the_names_the_checkpoint_kept(workdir):
    from test_serve_hostile import ThreadServer

    from flower_classifier.inference.predictor import Predictor

    folder, _, _ = workdir
    server = ThreadServer(Predictor(folder / "runs" / "train" / "checkpoint.pth",
                                    engine="torch"))
    try:
        assert server.client.get("/classes").json()["names"] == [
            NAMES[name] for name in ("1", "10", "2")]
    finally:
        server.stop()


def test_old_checkpoints_without_names_show_folder_names(workdir, tmp_path):
    from flower_classifier.inference.predictor import Predictor
    from flower_classifier.models.checkpoint import load_checkpoint, save_checkpoint

    folder, _, _ = workdir
    checkpoint = load_checkpoint(folder / "runs" / "train" / "checkpoint.pth")
    del checkpoint["class_names"]
    save_checkpoint(checkpoint, tmp_path / "old.pth")
    assert Predictor(tmp_path / "old.pth").names == ["1", "10", "2"]
