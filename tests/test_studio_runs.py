"""The studio's runs in-process (studio/retrain.py), on made-up features of three classes: the
first run trains the folder as filed, a retrain continues its head with the decisions applied,
runs.json keeps them across a restart, and the per-class results count what they should; new
photos' suggestions and additions; the camera try-out's reading of serve.py's address."""
import json
import logging
import queue

import pytest
import torch
from PIL import Image

from flower_classifier.data.corrections import load_corrections, photo_key, record_decisions
from flower_classifier.data.folders import Split
from flower_classifier.data.split import Dataset
from flower_classifier.models.backbones import build_backbone
from flower_classifier.models.classifier import weights_copy
from flower_classifier.serve.answers import BadRequest
from flower_classifier.serve.config import ServeConfig
from flower_classifier.studio.retrain import (
    RELABELLED_REPEATS,
    RUNS_NAME,
    SCHEDULES,
    QuickTrainer,
    class_results,
    corrected_inputs,
    fit_head,
    quick_config,
    rooted,
)
from flower_classifier.studio.labelling import suggested_batches
from flower_classifier.studio import state
from flower_classifier.studio.state import (
    NEW,
    Studio,
    StudioOptions,
    unlabelled_photos,
)
from flower_classifier.studio.thumbnails import ThumbnailWarmer
from flower_classifier.studio.tryout import CameraTryOut, address
from flower_classifier.utils.errors import UserError

CPU = torch.device("cpu")
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("efficientnet_lite0")


def make_studio(root, backbone, per_class={"train": 12, "valid": 4}, new_labels=()):
    """A Studio over made-up photo paths whose features tell the classes apart; new_labels:
    the classes of new photos (empty files in root/new, the --unlabelled folder)."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.zeros(len(CLASSES), backbone.feature_dim)
    for label in range(len(CLASSES)):
        centres[label, label * 200:(label + 1) * 200] = 4.0

    def features_of(labels):
        rows = centres[labels] + torch.rand(len(labels), backbone.feature_dim,
                                            generator=generator)
        return rows.half(), torch.ones(len(labels), dtype=torch.bool)

    splits, features = {}, {}
    for name, count in per_class.items():
        labels = [label for label in range(len(CLASSES)) for _ in range(count)]
        paths = [root / name / CLASSES[label] / f"{index}.jpg"
                 for index, label in enumerate(labels)]
        splits[name] = Split(root / name, paths, labels)
        features[name] = features_of(labels)
    new_paths = [root / "new" / f"{index}.jpg" for index in range(len(new_labels))]
    if new_labels:
        (root / "new").mkdir()
        for path in new_paths:
            path.touch()
        rows, ok = features_of(list(new_labels))  # noisier: no two are near-copies
        features[NEW] = (rows + torch.randn(rows.shape, generator=generator).half(), ok)
    options = StudioOptions(str(root), save_dir=str(root / "save"), cache_dir=None,
                            unlabelled=str(root / "new") if new_labels else None)
    (root / "save").mkdir(parents=True, exist_ok=True)
    dataset = Dataset({name: index for index, name in enumerate(CLASSES)}, splits)
    empty = {key: [] for key in ("exact_duplicates", "near_duplicates", "mislabelled",
                                 "unreadable", "tiny")}
    return Studio(options, dataset, features, empty, backbone, new_paths)


def finished(trainer, run):
    return trainer.wait(run["id"], timeout=120)


def test_the_first_run_trains_as_filed_and_a_retrain_continues_it(tmp_path, backbone):
    studio = make_studio(tmp_path, backbone)
    trainer = QuickTrainer(studio, CPU)
    first = trainer.start_first()
    with pytest.raises(BadRequest) as refused:  # one run at a time
        trainer.start()
    assert refused.value.status == 409 and "still training" in str(refused.value)
    first = finished(trainer, first)
    assert first["kind"] == "as filed" and first["status"] == "done"
    assert first["valid_accuracy"] == 1.0 and first["changes"]["relabelled"] == 0
    moved = studio.photos[0]  # a train photo of class a, said to be of class b
    record_decisions(studio.corrections_path, {moved.path: "b"})
    second = finished(trainer, trainer.start())
    assert second["kind"] == "warm" and second["status"] == "done", second
    assert second["epochs"] == SCHEDULES["warm"]["epochs"] == len(second["history"])
    assert second["changes"]["relabelled"] == 1 and second["changes"]["train"] == 36
    assert second["seconds_left"] is None and second["classes"]["recall"] == [1.0, 1.0, 1.0]
    assert trainer.latest[0] == second["id"] and trainer.latest[2].hidden_units == 512
    # The warm retrain saw the relabelled photo RELABELLED_REPEATS more times, under class b.
    cached, ids, _ = corrected_inputs(studio, load_corrections(studio.corrections_path),
                                      RELABELLED_REPEATS)
    inputs, labels = cached.data["train"]
    assert inputs.shape[1] == 36 + RELABELLED_REPEATS and len(ids["train"]) == 36
    assert labels.bincount().tolist() == [11, 13 + RELABELLED_REPEATS, 12]
    assert (inputs[0, -RELABELLED_REPEATS:] == studio.features["train"][0][moved.row]).all()


def test_fit_head_starts_from_the_weights_it_is_given(tmp_path, backbone):
    studio = make_studio(tmp_path, backbone)
    cached, _, _ = corrected_inputs(studio, {})
    still = quick_config(tmp_path, epochs=1, learning_rate=1e-9)
    first, _ = fit_head(quick_config(tmp_path), backbone, 3, cached, CPU)
    weights = weights_copy(first.head)
    continued, valid = fit_head(still, backbone, 3, cached, CPU, init=weights)
    anew, _ = fit_head(still, backbone, 3, cached, CPU)
    assert torch.allclose(continued.head[1].weight, weights["1.weight"], atol=1e-5)
    assert not torch.allclose(anew.head[1].weight, weights["1.weight"], atol=1e-4)
    assert valid["accuracy"] == 1.0


def test_runs_are_kept_in_runs_json_and_listed_after_a_restart(tmp_path, backbone):
    studio = make_studio(tmp_path, backbone)
    trainer = QuickTrainer(studio, CPU)
    finished(trainer, trainer.start_first())
    saved = json.loads((studio.save_dir / RUNS_NAME).read_text())["runs"]
    assert [run["kind"] for run in saved] == ["as filed"] and saved[0]["status"] == "done"
    saved.append({**saved[0], "id": 2, "status": "running"})  # killed while training
    (studio.save_dir / RUNS_NAME).write_text(json.dumps({"runs": saved}))
    again = QuickTrainer(studio, CPU)
    assert [run["earlier"] for run in again.runs_json()] == [True, True]
    assert again.runs[1]["status"] == "failed" and "stopped before" in again.runs[1]["error"]
    assert finished(again, again.start_first())["id"] == 3


def test_a_warm_retrain_without_a_first_run_says_what_to_do(tmp_path, backbone):
    studio = make_studio(tmp_path, backbone)
    trainer = QuickTrainer(studio, CPU)
    trainer.first_done.set()  # as when the first run failed
    run = finished(trainer, trainer.start())
    assert run["status"] == "failed" and "--retrain full" in run["error"]


def test_new_photos_come_in_batches_by_class_and_a_label_adds_one_to_train(tmp_path, backbone):
    new_labels = [0, 0, 0, 1, 1, 2, 2]
    studio = make_studio(tmp_path, backbone, new_labels=new_labels)
    twin, of = studio.new_ids[6], studio.new_ids[5]  # a near-copy: one of them is suggested
    studio.features[NEW][0][studio.photos[twin].row] = studio.features[NEW][0][
        studio.photos[of].row]
    trainer = QuickTrainer(studio, CPU)
    finished(trainer, trainer.start_first())
    batches = suggested_batches(studio, trainer.latest[1], set(), batch=2)
    suggested = [photo_id for batch in batches for photo_id in batch["ids"]]
    assert sorted(suggested) == sorted(set(studio.new_ids) - {twin}) or sorted(
        suggested) == sorted(set(studio.new_ids) - {of})
    order = [batch["predicted"] for batch in batches]
    assert order == sorted(order, key=order.index)  # each class's batches one after another
    assert sorted(len(batch["ids"]) for batch in batches) == [1, 1, 2, 2]  # 3, 2, 1 by 2
    for batch in batches:
        assert {new_labels[studio.photos[i].row] for i in batch["ids"]} == {batch["predicted"]}
        assert all(0 < probability <= 1 for probability in batch["probabilities"])
    first, left_out = studio.new_ids[0], studio.new_ids[3]
    mine, _ = studio.decide([{"id": first, "label": "b"}, {"id": left_out, "label": None}])
    assert {key: entry["label"] for key, entry in mine.items()} == {first: "b", left_out: None}
    entries = json.loads(studio.corrections_path.read_text())["decisions"].values()
    assert {entry["split"] for entry in entries} == {"train"}
    decided = set(studio.decisions()[0])
    later = suggested_batches(studio, trainer.latest[1], decided)
    assert decided.isdisjoint(i for batch in later for i in batch["ids"])
    second = finished(trainer, trainer.start())
    assert second["changes"]["added"] == 1 and second["changes"]["train"] == 37, second
    assert second["status"] == "done"
    # Restarted without --unlabelled: the added photo is not trained on, nor counted.
    without = Studio(studio.options, studio.dataset, studio.features, studio.report, backbone)
    _, ids, counts = corrected_inputs(without, load_corrections(studio.corrections_path))
    assert counts["added"] == 0 and len(ids["train"]) == 36


def test_inputs_rooted_as_they_are_gathered_are_the_rooted_inputs(tmp_path, backbone):
    studio = make_studio(tmp_path, backbone, new_labels=[0, 2])
    studio.decide([{"id": studio.new_ids[1], "label": "c"}, {"id": 0, "label": "b"}])
    decisions = load_corrections(studio.corrections_path)
    plain, _, _ = corrected_inputs(studio, decisions, 2)
    gathered, _, _ = corrected_inputs(studio, decisions, 2, root=True)
    expected = rooted(plain)
    assert gathered.rooted and expected.rooted and not plain.rooted
    for name in ("train", "valid"):
        assert gathered.data[name][0].dtype == torch.float32
        assert torch.equal(gathered.data[name][0], expected.data[name][0])
        assert torch.equal(gathered.data[name][1], plain.data[name][1])
    assert gathered.data["train"][0].shape[1] == 36 + 1 + 2  # one added, one relabelled twice


def test_a_new_photo_that_is_a_filed_one_stays_filed(tmp_path, backbone):
    studio = make_studio(tmp_path, backbone, new_labels=[0, 1])
    filed, new = studio.photos[0].path, str(tmp_path / "new" / "1.jpg")
    again = Studio(studio.options, studio.dataset, studio.features, studio.report, backbone,
                   [filed, new, new])  # a filed photo, and one new photo listed twice
    assert [(again.photos[i].path, again.photos[i].row) for i in again.new_ids] == [(new, 1)]
    assert again.by_key[photo_key(new)] == again.new_ids[0]
    assert again.photos_of([filed])[0].split == "train"


def test_the_unlabelled_folder_must_hold_images_outside_the_data_and_save_folders(tmp_path):
    (tmp_path / "photos" / "a").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "new").mkdir()
    for folder, words in ((tmp_path / "photos" / "a", "overlaps the data folder"),
                          (tmp_path, "overlaps the data folder"),
                          (tmp_path / "empty", "holds no images"),
                          (tmp_path / "missing", "is not a folder")):
        options = StudioOptions(str(tmp_path / "photos"), unlabelled=str(folder))
        with pytest.raises(UserError, match=words):
            unlabelled_photos(options)
    options = StudioOptions(str(tmp_path / "photos"), save_dir=str(tmp_path / "new" / "studio"),
                            unlabelled=str(tmp_path / "new"))
    with pytest.raises(UserError, match="holds the save folder"):
        unlabelled_photos(options)


def test_class_results_count_recall_precision_and_confusions():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predictions = torch.tensor([0, 1, 1, 1, 1, 1])
    result = {"labels": labels, "predictions": predictions}
    results = class_results(result, [10, 11, 12, 13, 14, 15], class_count=4)
    assert results["recall"] == [round(1 / 3, 4), 1.0, 0.0, None]  # class 3: no photo
    assert results["precision"] == [1.0, 0.4, None, None]  # 2 of 5 named 1 were; none named 2
    assert results["confusions"] == [
        {"true": 0, "predicted": 1, "count": 2, "ids": [11, 12]},
        {"true": 2, "predicted": 1, "count": 1, "ids": [15]}]


def test_the_camera_try_out_reads_serve_py_s_address_or_says_why_not(tmp_path):
    lines = queue.Queue()
    for line in ("warning: listening on 0.0.0.0:5: anyone", "serving 3 classes at "
                 "http://10.0.0.2:41234/#token=x (Ctrl-C to stop)"):
        lines.put(line)
    assert address(lines) == "http://10.0.0.2:41234/#token=x"
    lines.put("error: checkpoint.pth is not a checkpoint; pass train.py's")
    lines.put(None)
    with pytest.raises(BadRequest) as stopped:
        address(lines)
    assert stopped.value.status == 500 and "is not a checkpoint" in str(stopped.value)
    with pytest.raises(BadRequest) as late:
        address(queue.Queue(), timeout=0.05)
    assert late.value.status == 504
    tryout = CameraTryOut(ServeConfig(host="127.0.0.1"), CPU)
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    tryout.stop(close=True)  # the studio is stopping: nothing starts after that
    with pytest.raises(BadRequest) as closed:
        tryout.start(tmp_path / "checkpoint.pth")
    assert closed.value.status == 503 and tryout.process is None


def test_thumbnails_are_warmed_first_pages_first_then_every_photo(tmp_path, backbone,
                                                                   monkeypatch):
    monkeypatch.setattr(state, "PHOTOS_SHOWN", 5)  # pages of 5: 11 more per class after them
    studio = make_studio(tmp_path, backbone, new_labels=[0, 1])
    first, order = studio.first_pages(), studio.thumbnail_order()
    assert len(first) == 5 * len(CLASSES) and order[:len(first)] == first
    assert sorted(order) == list(range(len(studio.photos)))  # every photo once
    rest = [studio.photos[i].label for i in order[len(first):-2]]
    assert rest == sorted(rest) and order[-2:] == list(studio.new_ids)  # Browse's order
    studio.thumbnailed = {studio.photos[i].path for i in order[::2]}  # the check made these
    assert studio.thumbnails_to_make() == order[1::2]


def test_the_warmer_stops_when_its_folder_cannot_be_written(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (200, 30, 60)).save(photo)
    blocker = tmp_path / "thumbnails"
    blocker.write_text("a file where the thumbnails' folder should be")
    asked = []

    class Photos:  # what the warmer asks of a Studio: 50 photos, all decodable
        def thumbnails_to_make(self):
            return list(range(50))

        def image_path(self, photo_id):
            asked.append(photo_id)
            return photo

    records, logged = [], logging.Handler()
    logged.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("uvicorn.error")  # the studio's; it may not pass records to the root
    log.addHandler(logged)
    try:
        warmer = ThumbnailWarmer(Photos(), blocker)
        warmer.start()  # its own thread, which lowers its own priority
        warmer.thread.join(timeout=60)
    finally:
        log.removeHandler(logged)
    assert not warmer.thread.is_alive() and asked == [0]  # no decode per photo after a failure
    assert any("thumbnails stopped" in message for message in records)
    assert blocker.read_text().startswith("a file")
