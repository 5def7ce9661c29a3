"""train.py on one folder of class folders: the automatic split, its manifest, the data check
before training, class weights, and the mistakes sheet after the test report."""
import json
import shutil

import pytest
import torch

import train
from conftest import FLOWERS, link_class_folders, require_shared_data, train_args
from flower_classifier.data.split import MANIFEST_NAME, read_manifest
from flower_classifier.models.checkpoint import load_checkpoint
from flower_classifier.reports.evaluation import write_evaluation

CLASSES = ("1", "10", "2")


@pytest.fixture
def one_folder(tmp_path):
    """14 real photos of each of three classes in one folder per class (symlinks), plus a copy
    of a class-1 photo filed under class 2."""
    root = link_class_folders(tmp_path / "photos", 14, CLASSES)
    shutil.copyfile(sorted((root / "1").iterdir())[0], root / "2" / "copy_of_a_1.jpg")
    return root


def split_of(manifest):
    return {(entry["class"], entry["path"]): entry["split"] for entry in manifest["files"]}


def test_one_folder_trains_with_no_extra_flag_and_keeps_its_split(one_folder, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    result = train.main(train_args(one_folder, run, cache, "--epochs", "2"))
    manifest = read_manifest(run / MANIFEST_NAME)
    placed = split_of(manifest)
    assert len(placed) == 43 and set(placed.values()) == {"train", "valid", "test"}
    checkpoint = load_checkpoint(run / "checkpoint.pth")
    counts = checkpoint["split"]["counts"]
    assert sum(counts.values()) == 43 and counts["test"] > 0
    assert result["test_accuracy"] is not None
    assert checkpoint["hyperparameters"]["class_weights"] == "auto"
    # The copy filed under another class is reported, and lands in its original's split.
    report = json.loads((run / "data_report.json").read_text())
    across = [group for group in report["exact_duplicates"] if "across_classes" in group["kinds"]]
    assert len(across) == 1 and {entry["class"] for entry in across[0]["files"]} == {"1", "2"}
    original = sorted(p.name for p in (one_folder / "1").iterdir())[0]
    assert placed[("2", "2/copy_of_a_1.jpg")] == placed[("1", f"1/{original}")]

    # Photos added later never move the ones already placed.
    extra = sorted((FLOWERS / "train" / "10").iterdir())[14:20]
    for image in extra:
        (one_folder / "10" / image.name).symlink_to(image)
    train.main(train_args(one_folder, run, cache, "--epochs", "1"))
    again = split_of(read_manifest(run / MANIFEST_NAME))
    assert len(again) == 49
    assert {key: again[key] for key in placed} == placed


def test_split_from_trains_on_the_manifest_it_names(one_folder, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    train.main(train_args(one_folder, run, cache, "--epochs", "1", "--no_data_check"))
    assert not (run / "data_report.json").exists()
    manifest = read_manifest(run / MANIFEST_NAME)
    dropped = next(entry for entry in manifest["files"] if entry["split"] == "train")
    manifest["files"].remove(dropped)
    cleaned = tmp_path / "cleaned_manifest.json"
    cleaned.write_text(json.dumps(manifest))
    train.main(train_args(one_folder, tmp_path / "run2", cache, "--epochs", "1",
                          "--split_from", cleaned))
    counts = load_checkpoint(tmp_path / "run2" / "checkpoint.pth")["split"]["counts"]
    assert counts["train"] == sum(1 for e in manifest["files"] if e["split"] == "train")
    assert sum(counts.values()) == 42


def test_a_bad_split_is_one_clear_error(one_folder, tmp_path):
    from flower_classifier.utils.errors import UserError
    with pytest.raises(UserError, match="--split '0.8,0.3' must add up to 1"):
        train.main(train_args(one_folder, tmp_path / "run", tmp_path / "cache",
                              "--split", "0.8,0.3"))


def test_mistakes_sheet_names_the_wrong_photos_worst_first(tmp_path):
    require_shared_data()
    paths = [str(p) for p in sorted((FLOWERS / "train" / "1").iterdir())[:3]]
    probabilities = torch.tensor([[4.0, 0.0], [0.0, 1.0], [0.0, 5.0]]).softmax(1)  # 2 wrong
    evaluation = write_evaluation(tmp_path, [0, 0, 0], probabilities,
                                  ["pink primrose", "globe thistle"], paths)
    assert evaluation.mistakes == 2
    assert evaluation.report["accuracy"] == pytest.approx(1 / 3)
    assert (tmp_path / "mistakes.png").stat().st_size > 0
    assert (tmp_path / "mistakes.html").read_text().count("<figure>") == 2
    # Without the photos' order (fine-tuning that skipped an image) no sheet is drawn.
    evaluation = write_evaluation(tmp_path / "none", [0, 0, 0], probabilities, ["a", "b"])
    assert evaluation.mistakes is None
    assert not (tmp_path / "none" / "mistakes.png").exists()
    assert not (tmp_path / "none" / "mistakes.html").exists()
