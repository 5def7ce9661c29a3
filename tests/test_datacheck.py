"""The data check (flower_classifier/datacheck) and check_data.py: a small real photo folder with planted problems (copies
within and across classes, a near-copy, an unreadable file, a tiny image) is checked as a user
would; the rules underneath on hand-made numbers."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import link_class_folders, run_command
from flower_classifier.data import folders
from flower_classifier.data.split import manifest_splits, read_manifest
from flower_classifier.datacheck import cleaning, facts, findings
from flower_classifier.datacheck import report as check_report
from flower_classifier.datacheck.report import (
    REPORT_NAME,
    SHEETS_FOLDER,
    report_fingerprint,
    summary_lines,
)
from flower_classifier.models.features import split_features
from flower_classifier.utils.errors import UserError

CLASSES = ("1", "10", "2")
PHOTOS = 10


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """(folder, planted: {name: relative path}): three classes of real flowers with problems."""
    folder = link_class_folders(tmp_path_factory.mktemp("messy") / "photos", PHOTOS, CLASSES)
    first = sorted((folder / "1").iterdir())[0]
    planted = {"original": f"1/{first.name}", "copy_in_class": "1/copy.jpg",
               "copy_in_other_class": "2/copy_from_1.jpg", "near_copy": "1/near.jpg",
               "unreadable": "10/broken.jpg", "tiny": "10/tiny.png"}
    shutil.copyfile(first, folder / planted["copy_in_class"])
    shutil.copyfile(first, folder / planted["copy_in_other_class"])
    with Image.open(first) as image:
        image.resize((image.width * 3 // 4, image.height * 3 // 4)).save(
            folder / planted["near_copy"], quality=80)
    (folder / planted["unreadable"]).write_bytes(b"not a photo")
    Image.new("RGB", (40, 30), "orange").save(folder / planted["tiny"])
    return folder, planted


@pytest.fixture(scope="module")
def checked(messy, tmp_path_factory):
    """check_data.py run on the folder: (completed process, save_dir, cache_dir)."""
    folder, _ = messy
    root = tmp_path_factory.mktemp("check")
    result = run_command("check_data.py", folder, "--save_dir", root / "out", "--cache_dir",
                         root / "cache", "--workers", "0", "--fix")
    return result, root / "out", root / "cache"


def relative(entry, folder):
    return str(Path(entry["path"]).relative_to(folder))


def test_check_data_finds_the_planted_problems(messy, checked):
    folder, planted = messy
    result, out, _ = checked
    assert result.returncode == 0, result.stderr
    report = json.loads((out / REPORT_NAME).read_text())

    groups = [{relative(entry, folder) for entry in group["files"]}
              for group in report["exact_duplicates"]]
    assert groups == [{planted["original"], planted["copy_in_class"],
                       planted["copy_in_other_class"]}]
    assert report["exact_duplicates"][0]["kinds"] == ["within_class", "across_classes"]
    near = [{relative(entry, folder) for entry in pair["files"]}
            for pair in report["near_duplicates"]]
    assert {planted["original"], planted["near_copy"]} in near
    assert [relative(entry, folder) for entry in report["unreadable"]] == [planted["unreadable"]]
    assert [(relative(entry, folder), entry["width"], entry["height"])
            for entry in report["tiny"]] == [(planted["tiny"], 40, 30)]
    assert report["class_counts"]["1"]["total"] == PHOTOS + 2
    assert report["class_counts"]["10"]["total"] == PHOTOS + 2
    assert report["imbalance_ratio"] == pytest.approx((PHOTOS + 2) / (PHOTOS + 1))
    for finding in ("exact_duplicates", "near_duplicates", "unreadable", "tiny"):
        with Image.open(report["sheets"][finding]) as sheet:
            assert sheet.format == "PNG" and sheet.width > 500
    assert "exact duplicates: 1 groups (1 within class, 1 across classes, 0 across splits)" \
        in result.stdout
    assert "unreadable: 1; tiny (< 64 px): 1" in result.stdout


def test_fix_writes_a_cleaned_manifest_and_leaves_the_files(messy, checked):
    folder, planted = messy
    result, out, _ = checked
    manifest = read_manifest(out / "cleaned_manifest.json")
    listed = {entry["path"] for entry in manifest["files"]}
    for name in planted:
        assert (folder / planted[name]).exists()      # never deleted
    # One copy of the photo filed three times stays: one filed under class 1, as 2 of its 3
    # copies are; the copy filed under 2 and the unreadable file are left out.
    assert len(listed & {planted["original"], planted["copy_in_class"]}) == 1
    for name in ("copy_in_other_class", "unreadable"):
        assert planted[name] not in listed
    assert planted["tiny"] in listed                  # tiny: reported, kept
    dropped = {relative(entry, folder): entry["reason"]
               for entry in json.loads((out / "fix_dropped.json").read_text())}
    assert dropped[planted["copy_in_other_class"]].endswith(
        "filed under 1 (2 of 3 copies)")
    assert dropped[planted["unreadable"]] == "unreadable"
    assert "left out of the cleaned manifest" in result.stdout
    assert f"{folder / planted['copy_in_other_class']}: copy of " in result.stdout
    class_to_idx, found = manifest_splits(manifest, folder)
    assert list(class_to_idx) == sorted(CLASSES)
    assert sum(len(split.paths) for split in found.values()) == len(listed)
    assert "cleaned_manifest.json" in result.stdout


def test_warm_check_reads_no_image_and_gives_the_same_report(messy, checked, monkeypatch):
    folder, _ = messy
    _, out, cache = checked
    from flower_classifier.cli import check_data

    def must_not_run(path, *views):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(facts, "file_facts", must_not_run)
    args = check_data.get_args_parser().parse_args(
        [str(folder), "--save_dir", str(out / "warm"), "--cache_dir", str(cache),
         "--workers", "0"])
    report, _ = check_data.run_check(args)
    first = json.loads((out / REPORT_NAME).read_text())
    for finding in ("exact_duplicates", "near_duplicates", "unreadable", "tiny", "mislabelled"):
        assert report[finding] == first[finding]


def test_a_rerun_in_the_same_folder_keeps_its_report_until_something_changes(
        messy, checked, monkeypatch, tmp_path):
    folder, _ = messy
    _, _, cache = checked
    from flower_classifier.cli import check_data

    def check(*flags):
        args = check_data.get_args_parser().parse_args(
            [str(folder), "--save_dir", str(tmp_path), "--cache_dir", str(cache),
             "--workers", "0", *flags])
        return check_data.run_check(args)[0]

    first = check()
    written = (tmp_path / REPORT_NAME).stat().st_mtime_ns

    def must_not_run(*args):
        raise AssertionError("the unchanged data was checked again")

    with monkeypatch.context() as patched:
        patched.setattr(check_report, "near_duplicates", must_not_run)
        kept = check()
    assert kept.pop("kept") is True and kept == first
    assert "kept from the last check" in summary_lines(
        {**kept, "kept": True}, tmp_path)[-1]
    assert (tmp_path / REPORT_NAME).stat().st_mtime_ns == written
    (tmp_path / SHEETS_FOLDER / "tiny.png").unlink()
    assert check()["tiny"] == first["tiny"]  # a contact sheet gone: checked and written again
    assert (tmp_path / SHEETS_FOLDER / "tiny.png").is_file()
    other = check("--tiny_side", "20")  # other settings: another report
    assert other["settings"]["tiny_side"] == 20 and other["tiny"] == []


def test_the_fingerprint_changes_with_a_label_a_feature_or_a_file(tmp_path):
    paths = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for path in paths:
        path.write_bytes(b"photo")
    split = SimpleNamespace(paths=[str(path) for path in paths], labels=[0, 1])
    features = {"train": (torch.ones(2, 4, dtype=torch.float16), torch.tensor([True, True]))}
    classes = {"a": 0, "b": 1}

    def fingerprint(labels=(0, 1), rows=features["train"][0], ok=features["train"][1]):
        return report_fingerprint(
            classes, {"train": SimpleNamespace(paths=split.paths, labels=list(labels))},
            {"train": (rows, ok)}, {"seed": 0})

    first = fingerprint()
    assert fingerprint() == first
    assert fingerprint(labels=(1, 1)) != first
    changed = features["train"][0].clone()
    changed[1, 2] = 2
    assert fingerprint(rows=changed) != first
    assert fingerprint(ok=torch.tensor([True, False])) != first
    paths[1].write_bytes(b"another photo")
    assert fingerprint() != first


def test_fix_keeps_one_copy_of_a_duplicate_in_the_class_most_copies_agree_with():
    def entry(path, name, split="train"):
        return {"path": path, "class": name, "split": split}

    report = {"unreadable": [], "near_duplicates": [], "mislabelled": [], "exact_duplicates": [
        {"kinds": ["across_classes"],  # 2 of 3 copies in b: one of them stays, in train/
         "files": [entry("d/a/1.jpg", "a"), entry("d/b/2.jpg", "b", "valid"),
                   entry("d/b/3.jpg", "b")]},
        {"kinds": ["across_classes"],  # a tie: the first copy by path stays
         "files": [entry("d/y/5.jpg", "y"), entry("d/x/4.jpg", "x")]},
        {"kinds": ["within_class"],
         "files": [entry("d/a/7.jpg", "a", "test"), entry("d/a/6.jpg", "a", "valid")]}]}
    dropped = cleaning.files_to_drop(report)
    assert set(dropped) == {"d/a/1.jpg", "d/b/2.jpg", "d/y/5.jpg", "d/a/7.jpg"}
    assert dropped["d/a/1.jpg"] == ("copy of d/b/3.jpg filed under class a; the copy kept is "
                                    "filed under b (2 of 3 copies)")
    assert dropped["d/b/2.jpg"] == "exact duplicate of d/b/3.jpg, which is kept"


def test_fix_names_the_suggested_class_as_the_sheets_do():
    report = {"unreadable": [], "near_duplicates": [], "exact_duplicates": [],
              "settings": {"class_names": {"97": "mallow"}},
              "mislabelled": [{"path": "d/96/1.jpg", "class": "96", "split": "train",
                               "suggested": "97"},
                              {"path": "d/97/2.jpg", "class": "97", "split": "train",
                               "suggested": "12"}]}
    dropped = cleaning.files_to_drop(report)
    assert dropped["d/96/1.jpg"] == "likely mislabelled (suggested mallow)"
    assert dropped["d/97/2.jpg"] == "likely mislabelled (suggested 12)"  # no name given


def test_check_data_user_errors(tmp_path):
    result = run_command("check_data.py", tmp_path / "missing", "--save_dir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    from flower_classifier.cli import check_data

    args = check_data.get_args_parser().parse_args([str(tmp_path), "--split_from",
                                                    str(tmp_path / "none.json")])
    with pytest.raises(UserError, match="cannot read split manifest"):
        check_data.run_check(args)


class RecordingExtractor:
    """Stands in for FeatureExtractor: records the calls, returns one feature per path."""

    def __init__(self):
        self.calls = []

    def features(self, root, paths, transform, description="features", mirror=False):
        self.calls.append((str(root), list(paths), mirror))
        return torch.arange(len(paths), dtype=torch.float16)[:, None], torch.ones(
            len(paths), dtype=torch.bool)


def test_split_features_makes_train_pys_calls_for_a_layout():
    layout = {name: folders.Split(Path(f"/data/{name}"), [f"/data/{name}/a/{i}.jpg" for i in
                                                          range(3)], [0, 0, 0])
              for name in ("train", "valid", "test")}
    extractor = RecordingExtractor()
    features = split_features(extractor, layout, None)
    assert extractor.calls == [("/data/train", layout["train"].paths, False),
                               ("/data/valid", layout["valid"].paths, True),
                               ("/data/test", layout["test"].paths, True)]
    assert features["test"][0][:, 0].tolist() == [0, 1, 2]


def test_split_features_shares_one_call_per_folder_and_mirroring():
    one_folder = {name: folders.Split(Path("/photos"), [f"/photos/a/{name}{i}.jpg" for i in
                                                       range(count)], [0] * count)
                  for name, count in (("train", 4), ("valid", 2), ("test", 3))}
    extractor = RecordingExtractor()
    features = split_features(extractor, one_folder, None)
    assert [(root, len(paths), mirror) for root, paths, mirror in extractor.calls] == [
        ("/photos", 4, False), ("/photos", 5, True)]
    assert features["valid"][0][:, 0].tolist() == [0, 1]
    assert features["test"][0][:, 0].tolist() == [2, 3, 4]


def test_confident_learning_rule():
    probabilities = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.2, 0.8],
                                  [0.1, 0.9], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # thresholds: class 0 (0.9 + 0.8 + 0.2) / 3 = 0.633, class 1 (0.8 + 0.9 + 0.4) / 3 = 0.7
    ranked, suggested = findings.confident_learning(probabilities, labels)
    assert ranked == [2]                  # 0.8 >= 0.7 for class 1; image 5: 0.6 < 0.633
    assert suggested.tolist() == [0, 0, 1, 1, 1, 0]


def test_likely_mislabelled_finds_a_flipped_label():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 32, generator=generator) * 4
    labels = torch.arange(3).repeat_interleave(30)
    features = centres[labels] + torch.randn(90, 32, generator=generator)
    rows = [{"path": f"{i}.jpg", "class": str(int(label)), "label": int(label),
             "split": "train", "sha256": str(i), "ok": True} for i, label in enumerate(labels)]
    rows[7]["label"], rows[7]["class"] = 2, "2"          # a class-0 photo filed under 2
    suspects = findings.likely_mislabelled(rows, features, ["0", "1", "2"])
    assert suspects[0]["path"] == "7.jpg"
    assert suspects[0]["suggested"] == "0" and suspects[0]["class"] == "2"
    assert len(suspects) <= 3


def test_cleaned_manifest_drops_leaks_and_keeps_one_copy(tmp_path):
    manifest = {"format": 1, "roots": {"train": "train", "valid": "valid"}, "classes": ["a"],
                "files": [{"path": f"a/{name}", "class": "a", "split": split, "sha256": name}
                          for split, name in (("train", "x.jpg"), ("valid", "x.jpg"),
                                              ("train", "y.jpg"), ("valid", "z.jpg"))]}

    def entry(split, name):
        return {"path": str(tmp_path / split / "a" / name), "class": "a", "split": split}

    report = {"unreadable": [], "mislabelled": [],
              "exact_duplicates": [{"kinds": ["within_class", "across_splits"],
                                    "files": [entry("valid", "x.jpg"), entry("train", "x.jpg")]}],
              "near_duplicates": [{"kinds": ["within_class", "across_splits"],
                                   "files": [entry("valid", "z.jpg"), entry("train", "y.jpg")]}]}
    cleaned, dropped = cleaning.cleaned_manifest(manifest, tmp_path, report)
    assert [(e["split"], e["path"]) for e in cleaned["files"]] == [("train", "a/x.jpg"),
                                                                  ("train", "a/y.jpg")]
    assert set(dropped.values()) == {f"exact duplicate of {tmp_path}/train/a/x.jpg, which is kept",
                                     "near-duplicate of a photo in another split"}
