"""data/split.py: the hash split of one folder of class folders, its manifest, and that a manifest
gives back what data.folders.find_splits gives for the same files."""
import json
import shutil

import pytest
from PIL import Image

from conftest import make_subset
from flower_classifier.data.folders import find_splits
from flower_classifier.data.split import (
    MANIFEST_NAME,
    file_digest,
    is_one_folder,
    manifest_of_layout,
    manifest_splits,
    parse_fractions,
    read_manifest,
    split_folder,
    write_manifest,
)
from flower_classifier.utils.errors import UserError


def photo_folder(root, counts, size=8):
    """Class folders of small distinct PNGs: {"cat": 12} makes cat/0.png ... cat/11.png."""
    for number, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for index in range(count):
            shade = number * 40, index % 256, index // 256
            Image.new("RGB", (size, size), shade).save(root / name / f"{index}.png")
    return root


def placement(manifest):
    return {(entry["class"], entry["path"]): entry["split"] for entry in manifest["files"]}


def test_parse_fractions():
    assert parse_fractions("0.8,0.1,0.1") == {"train": 0.8, "valid": 0.1, "test": 0.1}
    assert parse_fractions("0.9,0.1") == {"train": 0.9, "valid": 0.1}
    assert parse_fractions("0.9,0.1,0") == {"train": 0.9, "valid": 0.1}
    for bad in ("0.8,0.1", "a,b,c", "1", "0,0.5,0.5", "0.8,-0.1,0.3"):
        with pytest.raises(UserError, match="--split"):
            parse_fractions(bad)


def test_is_one_folder(tmp_path):
    photo_folder(tmp_path / "photos", {"a": 3})
    assert is_one_folder(tmp_path / "photos")
    (tmp_path / "photos" / "train").mkdir()
    assert not is_one_folder(tmp_path / "photos")
    assert not is_one_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no class folders with images"):
        split_folder(tmp_path / "empty")


def test_split_is_stratified_and_by_content(tmp_path):
    root = photo_folder(tmp_path / "photos", {"cat": 60, "dog": 40})
    shutil.copyfile(root / "cat" / "5.png", root / "dog" / "copy_of_cat_5.png")
    shutil.copyfile(root / "cat" / "5.png", root / "cat" / "again_5.png")
    manifest = split_folder(root)

    placed = placement(manifest)
    assert len(placed) == 102
    assert placed[("dog", "dog/copy_of_cat_5.png")] == placed[("cat", "cat/5.png")] \
        == placed[("cat", "cat/again_5.png")]
    for name in ("cat", "dog"):
        shares = [split for (cls, _), split in placed.items() if cls == name]
        assert set(shares) == {"train", "valid", "test"}
        assert shares.count("train") / len(shares) > 0.6
    for entry in manifest["files"]:
        assert entry["sha256"] == file_digest(root / entry["path"])


def test_copies_across_classes_stay_together_in_small_classes(tmp_path):
    root = photo_folder(tmp_path / "photos", {"a": 6, "b": 3, "c": 3})
    for name in ("b", "c"):
        for index in range(3):
            shutil.copyfile(root / "a" / f"{index}.png", root / name / f"copy_{index}.png")
    manifest = split_folder(root)
    by_digest = {}
    for entry in manifest["files"]:
        by_digest.setdefault(entry["sha256"], set()).add(entry["split"])
    assert all(len(placed) == 1 for placed in by_digest.values())


def test_adding_photos_never_moves_placed_ones(tmp_path):
    root = photo_folder(tmp_path / "photos", {"cat": 30, "dog": 30})
    before = placement(split_folder(root))
    Image.new("RGB", (9, 9), (1, 2, 3)).save(root / "cat" / "new.png")
    after_anew = placement(split_folder(root))
    assert all(after_anew[key] == split for key, split in before.items())
    assert len(after_anew) == len(before) + 1


def test_previous_manifest_is_kept(tmp_path):
    root = photo_folder(tmp_path / "photos", {"cat": 30, "dog": 30})
    previous = split_folder(root)
    moved = previous["files"][0]
    moved["split"] = "test" if moved["split"] != "test" else "valid"
    again = placement(split_folder(root, previous=previous))
    assert again[(moved["class"], moved["path"])] == moved["split"]


def test_every_class_reaches_every_split_and_small_classes_are_named(tmp_path, capsys):
    root = photo_folder(tmp_path / "photos", {"big": 40, "small": 3})
    manifest = split_folder(root)
    small = [entry["split"] for entry in manifest["files"] if entry["class"] == "small"]
    assert sorted(small) == ["test", "train", "valid"]
    assert "small" in capsys.readouterr().err
    photo_folder(tmp_path / "more", {"big": 40, "tiny": 2})
    with pytest.raises(UserError, match="class 'tiny' has 2 distinct photo"):
        split_folder(tmp_path / "more")


def test_manifest_round_trip_gives_find_splits_shape(tmp_path):
    root = photo_folder(tmp_path / "photos", {"b": 20, "a": 20, "10": 20, "2": 20})
    manifest = split_folder(root, {"train": 0.7, "valid": 0.3})
    path = tmp_path / "run" / MANIFEST_NAME
    write_manifest(manifest, path)
    class_to_idx, found = manifest_splits(read_manifest(path), root)

    assert class_to_idx == {"10": 0, "2": 1, "a": 2, "b": 3}
    assert set(found) == {"train", "valid"}
    listed = sorted(path for split in found.values() for path in split.paths)
    assert listed == sorted(str(p) for p in root.rglob("*.png"))
    for split in found.values():
        assert split.root == root
        assert split.labels == sorted(split.labels)
        for file, label in zip(split.paths, split.labels):
            assert file.startswith(f"{root}/{list(class_to_idx)[label]}/")


def test_layout_manifest_matches_find_splits(tmp_path):
    data = make_subset(tmp_path / "data")
    expected_classes, expected = find_splits(data)
    class_to_idx, found = manifest_splits(manifest_of_layout(data), data)
    assert class_to_idx == expected_classes
    assert found.keys() == expected.keys()
    for name in found:
        assert found[name] == expected[name]


def test_bad_manifests_are_clear_errors(tmp_path):
    root = photo_folder(tmp_path / "photos", {"a": 10, "b": 10})
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(path)
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(UserError, match="not a split manifest"):
        read_manifest(path)
    with pytest.raises(UserError, match="cannot read split manifest"):
        read_manifest(tmp_path / "missing.json")
    manifest = split_folder(root)
    (root / manifest["files"][0]["path"]).unlink()
    with pytest.raises(UserError, match="1 file\\(s\\) of the split manifest are missing"):
        manifest_splits(manifest, root)
