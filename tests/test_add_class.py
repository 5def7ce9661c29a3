"""Adding a class without starting over: a new class folder trains with only its own photos
through the backbone (the feature cache is keyed by folder, path and file stamps, so every
photo seen before comes from the cache), and a new class that is too small for the automatic
split, has an empty name or a name another class has, is one clear error."""
import json

import pytest
import torch

import train
from conftest import FLOWERS, link_class_folders, make_subset, run_command, train_args
from flower_classifier.data.class_names import check_class_names
from flower_classifier.utils.errors import UserError

SIZES = {"train": 6, "valid": 2, "test": 2}


def add_class(data, name, source_class="11", sizes=SIZES):
    """data/<split>/<name>/ with the first photos of source_class (symlinks)."""
    for split, count in sizes.items():
        folder = link_class_folders(data / split / "new", count, (source_class,), FLOWERS / split)
        (folder / source_class).rename(data / split / name)
        folder.rmdir()
    return sum(sizes.values())


@pytest.mark.parametrize("stages", [[], ["--train_stages", "0"]], ids=["default", "head"])
def test_a_new_class_folder_extracts_only_its_own_photos(tmp_path, stages):
    data = make_subset(tmp_path / "data", sizes=SIZES)
    cache = tmp_path / "cache"
    first = train.main(train_args(data, tmp_path / "run1", cache, "--epochs", "1",
                                  "--no_data_check", *stages))
    assert first["extracted_images"] == 3 * sum(SIZES.values())
    new_photos = add_class(data, "11")
    second = train.main(train_args(data, tmp_path / "run2", cache, "--epochs", "1",
                                   "--no_data_check", *stages))
    assert second["extracted_images"] == new_photos
    checkpoint = torch.load(second["checkpoint"], map_location="cpu", weights_only=False)
    assert sorted(checkpoint["class_to_idx"]) == ["1", "10", "11", "2"]


def test_a_new_class_too_small_for_the_split_gets_the_split_error(tmp_path):
    data = link_class_folders(tmp_path / "photos", 6, ("1", "10"))
    link_class_folders(tmp_path / "more", 2, ("11",))
    (tmp_path / "more" / "11").rename(data / "11")
    with pytest.raises(UserError, match=r"class '11' has 2 distinct photo\(s\); a split into "
                                        r"train, valid, test needs at least 3"):
        train.main(train_args(data, tmp_path / "run", tmp_path / "cache", "--epochs", "1"))


def test_a_new_class_named_like_another_is_refused_before_any_extraction(tmp_path):
    data = make_subset(tmp_path / "data", sizes=SIZES)
    (data / "cat_to_name.json").write_text(json.dumps(
        {"1": "pink primrose", "10": "globe thistle", "2": "hard-leaved pocket orchid"}))
    add_class(data, "Globe Thistle ")
    result = run_command("train.py", data, "--save_dir", tmp_path / "run", "--cache_dir",
                         tmp_path / "cache", "--epochs", "1", "--workers", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "error: classes '10' and 'Globe Thistle ' are both named 'Globe Thistle'; rename one "
        f"of the folders, or give it another name in {data / 'cat_to_name.json'}")
    assert not (tmp_path / "cache").exists()  # refused before any photo went through


@pytest.mark.parametrize("classes, names, message", [
    (["1", " "], ["a", " "], r"class ' ' has an empty name \(in its folder ' '\)"),
    (["1", "2"], ["a", ""], r"class '2' has an empty name \(in names.json\)"),
    (["1", "2"], ["Rose", "rose"], r"classes '1' and '2' are both named 'rose'"),
])
def test_class_names_that_are_empty_or_clash_are_refused(classes, names, message):
    with pytest.raises(UserError, match=message):
        check_class_names(classes, names, "names.json")
    check_class_names(["1", "2"], ["rose", "tulip"])
