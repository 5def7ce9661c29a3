"""studio.py as a client sees it: the real server in a subprocess on a loopback port, real HTTP
(httpx, and raw sockets where a client must not tidy the path), on a small folder of real
photos with a planted duplicate, three planted mislabelled photos and a planted link to a file
that is no photo; and the model download's refusals in this process, on runs made up."""
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest import FLOWERS, PROJECT, link_class_folders, run_command, run_script

CLASSES = ("1", "10", "2")
NAMES = {"1": "pink primrose", "10": "globe thistle", "2": "hard-leaved pocket orchid"}
TOKEN = "studio-secret"
# Photos of one class filed under another (source class, the class it is filed under): the
# data check names each a likely mislabelled photo.
MISFILED = (("10", "1"), ("2", "10"), ("1", "2"))
MANIFEST = "split_manifest.json"  # the studio's split, in its save folder
PHOTOS = 29  # make_folder's: 24 in the classes, the copy, the three misfiled and the link


def make_folder(root):
    """3 classes x 8 real photos (links), a copy of class 1's first photo filed under class 2,
    links to a photo of each class filed under another (misfiled_from_<class>.jpg), a link
    named like a photo that leads to /etc/passwd, and cat_to_name.json."""
    folder = link_class_folders(root, 8, CLASSES)
    first = min((folder / "1").iterdir())
    shutil.copyfile(first.resolve(), folder / "2" / "copy_of_primrose.jpg")
    for source, filed in MISFILED:
        ninth = sorted((FLOWERS / "train" / source).iterdir())[8]
        (folder / filed / f"misfiled_from_{source}.jpg").symlink_to(ninth)
    (folder / "10" / "secret.jpg").symlink_to("/etc/passwd")
    (folder / "cat_to_name.json").write_text(json.dumps(NAMES))
    return folder


# The final model's train.py flags: 3 epochs, one pass over the small folder each.
FINAL_FLAGS = ("--train_flags", "--epochs 3 --min_epoch_steps 0")


class Studio:
    """studio.py on a free loopback port (or as extra says)."""

    def __init__(self, folder, save_dir, cache_dir, *extra, url_host=None):
        self.process = subprocess.Popen(
            [sys.executable, "studio.py", str(folder), "--save_dir", str(save_dir),
             "--cache_dir", str(cache_dir), "--workers", "0", "--port", "0", *map(str, extra)],
            cwd=PROJECT, stdout=subprocess.PIPE, stderr=(errors := tempfile.TemporaryFile("w+")),
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.errors, self.lines = errors, queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        line = self._address_line(timeout=180)
        match = re.search(r"http://([\d.]+):(\d+)/", line)
        if not match:
            self.process.kill()
            self.process.wait(timeout=30)
            assert match, f"no address in {line!r}; stderr: {self.stderr()}"
        self.port = int(match[2])
        self.url = f"http://{url_host or match[1]}:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def _read_stdout(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _address_line(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if not line or line.startswith("studio: "):
                return line
        return ""

    def kill(self):
        """kill -9: no clean-up of any kind."""
        self.client.close()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self):
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            self.process.kill()
            self.process.wait(timeout=30)

    def stderr(self):
        self.errors.seek(0)
        return self.errors.read()


def raw_status(port, path, host="127.0.0.1"):
    """The status of GET path sent byte for byte (no client tidies ../ away)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                           .encode())
        answer = b"".join(iter(lambda: connection.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("studio") / "photos")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("studio_cache")


@pytest.fixture(scope="module")
def studio(folder, cache_dir, tmp_path_factory):
    server = Studio(folder, tmp_path_factory.mktemp("studio_save"), cache_dir, *FINAL_FLAGS)
    yield server
    server.stop()


def ids(state, name):
    return [index for index, photo in enumerate(state["photos"]) if photo[2] == name]


def test_the_state_names_classes_and_finds_the_planted_problems(studio):
    state = studio.client.get("/api/state").json()
    assert [row["name"] for row in state["classes"]] == [NAMES[c] for c in CLASSES]
    assert sum(row["total"] for row in state["classes"]) == len(state["photos"]) == PHOTOS
    copy, secret = ids(state, "copy_of_primrose.jpg")[0], ids(state, "secret.jpg")[0]
    groups = state["findings"]["exact_duplicates"]
    assert any(copy in group["ids"] and len(group["ids"]) == 2 for group in groups)
    assert secret in state["findings"]["unreadable"]
    suspects = {item["id"]: item["suggested"] for item in state["findings"]["mislabelled"]}
    for source, _ in MISFILED:
        assert suspects[ids(state, f"misfiled_from_{source}.jpg")[0]] == CLASSES.index(source)
    page = studio.client.get("/")
    assert page.status_code == 200 and "studio.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_thumbnails_are_re_encoded_and_cached_in_the_save_folder(studio, folder):
    answer = studio.client.get("/api/photos/0/thumb")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert answer.content[:2] == b"\xff\xd8"
    state = studio.client.get("/api/state").json()
    save_dir = re.sub(r"/corrections\.json$", "", state["corrections"])
    assert list((PROJECT / save_dir / "thumbnails").glob("*.jpg"))
    assert len(list((folder / "1").iterdir())) == 9  # nothing moved: 8 and the misfiled


def test_the_first_pages_thumbnails_are_made_before_anyone_asks(studio, folder):
    from flower_classifier.studio.thumbnails import THUMB_SIDE, view_name

    state = studio.client.get("/api/state").json()
    thumbnails = PROJECT / re.sub(r"/corrections\.json$", "", state["corrections"]) / "thumbnails"
    photos = [path for path in folder.rglob("*.jpg") if path.name != "secret.jpg"]
    expected = {view_name(path, THUMB_SIDE) for path in photos}
    deadline = time.monotonic() + 60
    while not expected <= {path.name for path in thumbnails.glob("*.jpg")}:
        assert time.monotonic() < deadline, "the first pages' thumbnails were not made"
        time.sleep(0.2)


def test_the_data_check_makes_the_thumbnails_from_what_it_reads(tmp_path, caplog, monkeypatch):
    import torch
    from PIL import Image

    from flower_classifier.datacheck import facts as check_facts
    from flower_classifier.datacheck.facts import cached_facts
    from flower_classifier.studio.thumbnails import CheckThumbnails, view_name

    photo = sorted((FLOWERS / "train" / "1").iterdir())[0]
    large = tmp_path / "large.jpg"  # decoded at 1/8 for the check: that covers a thumbnail
    Image.open(photo).convert("RGB").resize((3000, 2000)).save(large, quality=90)
    (tmp_path / "link.jpg").symlink_to(large)  # the same file: one thumbnail
    (tmp_path / "broken.jpg").write_bytes(b"not a photo")
    paths = [str(photo), str(large), str(tmp_path / "link.jpg"), str(tmp_path / "broken.jpg")]
    views = CheckThumbnails(tmp_path / "thumbnails")
    monkeypatch.setattr(check_facts, "FEWEST_FOR_WORKERS", 1)  # worker processes, as for many
    facts, pixels, readable = cached_facts(paths, None, tmp_path, views)
    monkeypatch.undo()
    plain = cached_facts(paths, None, tmp_path)  # in this process
    assert torch.equal(facts, plain[0]) and torch.equal(pixels, plain[1])  # the check unchanged
    assert readable.tolist() == [True, True, True, False]

    def fitted(path):  # the size a thumbnail of path has: Pillow's own fit
        with Image.open(path) as image:
            image.thumbnail((256, 256))
            return image.size

    made = {path.name: Image.open(path).size for path in views.folder.glob("*.jpg")}
    assert made == {view_name(photo, 256): fitted(photo), view_name(large, 256): fitted(large)}
    assert views.kept == set(paths[:3])  # what the studio's warmer skips
    unwritable = tmp_path / "a_file"
    unwritable.write_text("")  # a thumbnail folder that cannot be made
    with caplog.at_level("WARNING"):
        again = cached_facts(paths, None, tmp_path, CheckThumbnails(unwritable / "thumbnails"))
    assert torch.equal(again[0], facts)
    assert caplog.text.count("thumbnails not made during the check") == 1


def test_a_page_of_thumbnails_comes_in_one_answer_cut_by_its_lengths(studio):
    """GET /api/thumbs: each photo's thumbnail as /thumb gives it, one after the other; a photo
    that is no image (a link to /etc/passwd) gets length 0 and nothing of the file."""
    state = studio.client.get("/api/state").json()
    secret = ids(state, "secret.jpg")[0]
    wanted = [3, 0, secret, 1, 3]
    answer = studio.client.get("/api/thumbs", params={"ids": ",".join(map(str, wanted))})
    assert answer.status_code == 200
    lengths = [int(length) for length in answer.headers["x-lengths"].split(",")]
    assert len(lengths) == len(wanted) and lengths[2] == 0 and sum(lengths) == len(answer.content)
    offset = 0
    for photo_id, length in zip(wanted, lengths):
        if photo_id != secret:
            alone = studio.client.get(f"/api/photos/{photo_id}/thumb").content
            assert answer.content[offset:offset + length] == alone
        offset += length
    assert b"root:" not in answer.content
    for query, status in [("ids=", 400), ("ids=1,x", 400), ("ids=-1", 400), ("", 400),
                          ("ids=" + ",".join(["0"] * 241), 400), ("ids=0,999999", 404)]:
        refused = studio.client.get("/api/thumbs?" + query)
        assert refused.status_code == status, query
        assert refused.json()["error"].endswith("."), query


@pytest.mark.parametrize("route", ["thumb", "image", "heatmap"])
def test_every_file_serving_route_answers_a_path_with_404(studio, route):
    state = studio.client.get("/api/state").json()
    secret = ids(state, "secret.jpg")[0]
    for photo in ["../../../../etc/passwd", "..%2f..%2f..%2fetc%2fpasswd", "%2fetc%2fpasswd",
                  "/etc/passwd", "-1", str(PHOTOS), "999999", "0x1", str(secret)]:
        status, body = raw_status(studio.port, f"/api/photos/{photo}/{route}")
        assert status == 404, (photo, status, body)
        assert json.loads(body)["error"].endswith("."), body
        assert b"root:" not in body


def test_the_static_route_answers_a_path_with_404(studio):
    for path in ["/static/../state.py", "/static/..%2fstate.py", "/static/%2e%2e/app.py",
                 "/static//etc/passwd", "/static/../../../../etc/passwd"]:
        status, body = raw_status(studio.port, path)
        assert status == 404, (path, status)
        assert b"import" not in body and b"root:" not in body


def test_a_foreign_host_or_origin_gets_403(studio):
    status, body = raw_status(studio.port, "/api/state", host="rebinding.example.com")
    assert status == 403 and "does not answer to the name" in json.loads(body)["error"]
    answer = studio.client.post("/api/decisions", json={"decisions": [{"id": 0, "label": None}]},
                                headers={"Origin": "http://evil.example.com"})
    assert answer.status_code == 403
    assert "0" not in studio.client.get("/api/decisions").json()["decisions"]


@pytest.mark.parametrize("body, status, words", [
    (b"not json", 400, "not JSON"),
    (b'{"decisions": [{"id": 1, "label": "99"}]}', 400, "class folder names"),
    (b'{"decisions": [{"id": 4096, "label": null}]}', 404, "no photo 4096"),
    (b'{"decisions": []}', 400, "1 to"),
])
def test_a_bad_decision_is_one_sentence(studio, body, status, words):
    answer = studio.client.post("/api/decisions", content=body,
                                headers={"Content-Type": "application/json"})
    assert answer.status_code == status and words in answer.json()["error"]
    assert "Traceback" not in answer.text


def test_two_clients_deciding_about_different_photos_both_keep_their_decisions(studio):
    def decide(first):
        with httpx.Client(base_url=studio.url, timeout=60) as client:
            for photo in range(first, PHOTOS, 2):
                answer = client.post("/api/decisions",
                                     json={"decisions": [{"id": photo, "label": "2"}]})
                assert answer.status_code == 200

    clients = [threading.Thread(target=decide, args=(first,)) for first in (0, 1)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    decisions = studio.client.get("/api/decisions").json()["decisions"]
    assert set(decisions) >= {str(photo) for photo in range(PHOTOS)}
    forget = [{"id": photo, "forget": True} for photo in range(PHOTOS)]
    assert studio.client.post("/api/decisions", json={"decisions": forget}).json()[
        "decisions"] == {}


def test_decisions_survive_a_restart_and_kill_9_between_two_clicks(folder, cache_dir, tmp_path):
    save_dir = tmp_path / "save"
    first = Studio(folder, save_dir, cache_dir)
    assert first.client.post("/api/decisions", json={"decisions": [
        {"id": 3, "label": None}]}).status_code == 200
    assert first.stop() in (0, 143)
    second = Studio(folder, save_dir, cache_dir)
    assert second.client.get("/api/decisions").json()["decisions"]["3"]["label"] is None
    assert second.client.post("/api/decisions", json={"decisions": [
        {"id": 5, "label": "10"}]}).status_code == 200
    second.kill()  # straight after the click's answer
    third = Studio(folder, save_dir, cache_dir)
    decisions = third.client.get("/api/decisions").json()["decisions"]
    download = third.client.get("/api/corrections")
    third.stop()
    assert decisions["3"]["label"] is None and decisions["5"]["label"] == "10"
    assert download.headers["content-disposition"] == 'attachment; filename="corrections.json"'
    assert download.json()["format"] == 1 and all(
        key.startswith("/") for key in download.json()["decisions"])
    written = json.loads((save_dir / "corrections.json").read_text())
    assert written["format"] == 1 and len(written["decisions"]) == 2
    assert not list(save_dir.glob(".corrections.json.*.tmp"))


def last_run_ended(client, timeout=120):
    """The latest run once it has ended (the first one trains as the studio opens)."""
    deadline = time.monotonic() + timeout
    while (run := client.get("/api/runs").json()["runs"][-1])["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return run


def retrained(client):
    """Start a quick retrain once the run before it has ended, and wait for its end."""
    last_run_ended(client)
    assert client.post("/api/retrain").status_code == 202
    return last_run_ended(client)


def test_the_quick_retrain_applies_the_decisions_and_reports_valid_accuracy(studio):
    assert studio.client.post("/api/decisions", json={"decisions": [
        {"id": 0, "label": None}]}).status_code == 200
    run = retrained(studio.client)
    assert run["status"] == "done", run
    assert 0 <= run["valid_accuracy"] <= 1 and len(run["history"]) == run["epochs"]
    assert run["changes"]["dropped"] == 1
    heatmap = studio.client.get("/api/photos/20/heatmap")
    assert heatmap.status_code == 200 and heatmap.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_final_model_is_train_py_on_the_folder_with_the_decisions(studio):
    state = studio.client.get("/api/state").json()
    save_dir = Path(state["corrections"]).parent
    assert studio.client.get("/api/final").json() == {"status": "idle"}
    early = studio.client.post("/api/final/camera", json={})
    assert early.status_code == 409 and "Train the final model first" in early.json()["error"]
    started = studio.client.post("/api/final", json={})
    assert started.status_code == 202 and started.json()["status"] == "running"
    again = studio.client.post("/api/final", json={})
    assert again.status_code == 409 and "still training" in again.json()["error"]
    deadline = time.monotonic() + 300
    while (final := studio.client.get("/api/final").json())["status"] == "running":
        assert time.monotonic() < deadline, final
        time.sleep(0.5)
    assert final["status"] == "done", final
    assert 0 < final["valid_accuracy"] <= 1 and 0 <= final["test_accuracy"] <= 1
    assert final["best_epoch"] >= 1 and final["checkpoint"] == str(save_dir / "final" /
                                                                  "checkpoint.pth")
    assert final["epochs"] == 3  # studio.py --train_flags reached train.py
    log = (save_dir / "final" / "train.log").read_text()
    assert f"corrections {save_dir / 'corrections.json'}: " in log  # the decisions applied
    assert f"split as {save_dir / MANIFEST} records" in log  # the studio's split, kept
    from flower_classifier.inference.predictor import Predictor

    assert Predictor(final["checkpoint"]).classes == list(CLASSES)
    # The camera try-out: serve.py on the final model, bound as the studio is.
    camera = studio.client.post("/api/final/camera", json={})
    assert camera.status_code == 200, camera.text
    url = camera.json()["url"]
    assert url.startswith("http://127.0.0.1:") and f":{studio.port}/" not in url
    assert studio.client.post("/api/final/camera", json={}).json()["url"] == url  # one serve.py
    photo = next((FLOWERS / "valid" / "10").iterdir())
    answer = httpx.post(url.split("#")[0] + "predict", timeout=60,
                        files={"file": (photo.name, photo.read_bytes())})
    assert answer.status_code == 200, answer.text
    assert answer.text.count("globe thistle") >= 1  # the final model's names, in serve's answer


def head_predictions(state, decisions, run):
    """{photo id: class index} the run's head gives each valid photo it was scored on: the
    class a mistake names, else the photo's class after the decisions (none for the run on the
    folder as filed)."""
    decisions = {} if run["kind"] == "as filed" else decisions
    mistakes = {mistake["id"]: mistake["predicted"] for mistake in run["mistakes"]}
    folders = [row["folder"] for row in state["classes"]]
    predictions = {}
    for photo_id, (label, split, _) in enumerate(state["photos"]):
        decided = decisions.get(str(photo_id), {"label": folders[label]})["label"]
        if split == "valid" and decided is not None \
                and photo_id not in state["findings"]["unreadable"]:
            predictions[photo_id] = mistakes.get(photo_id, folders.index(decided))
    return predictions


def relative_path(state, photo_id):
    """A photo's path below the folder: its class folder and its name."""
    label, _, name = state["photos"][photo_id]
    return f"{state['classes'][label]['folder']}/{name}"


def model_path(state, run_id):
    """Where the studio keeps run_id's ONNX export (studio/ship.py)."""
    save_dir = PROJECT / re.sub(r"/corrections\.json$", "", state["corrections"])
    return save_dir / "runs" / str(run_id) / "onnx" / f"photos-run-{run_id}.onnx"


def onnx_metadata(path):
    import onnx

    props = {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}
    return json.loads(props["classifier.json"])


def test_the_latest_run_downloads_as_onnx_with_its_names_and_its_predictions(studio, folder,
                                                                              tmp_path):
    from flower_classifier.export.check import compared_outputs

    state = studio.client.get("/api/state").json()
    run = studio.client.get("/api/runs").json()["runs"][-1]  # the retrain test's
    answer = studio.client.get(f"/api/runs/{run['id']}/model", params={"format": "onnx"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-disposition"] == (
        f'attachment; filename="photos-run-{run["id"]}.onnx"')
    downloaded = tmp_path / "model.onnx"
    downloaded.write_bytes(answer.content)
    metadata = onnx_metadata(downloaded)
    assert metadata["classes"] == list(CLASSES)
    assert metadata["names"] == [NAMES[name] for name in CLASSES]
    expected = head_predictions(state, studio.client.get("/api/decisions").json()["decisions"],
                                run)
    photos = [str(folder / relative_path(state, photo_id)) for photo_id in expected]
    assert photos  # valid/'s photos
    exported = model_path(state, run["id"])
    checkpoint = exported.parents[1] / "checkpoint.pth"  # loaded as predict.py loads it
    for head, ((predicted, _), (probabilities, _)) in zip(
            expected.values(), compared_outputs(downloaded, "onnx", checkpoint, photos)):
        assert probabilities.argmax() == predicted.argmax() == head
    written = exported.stat().st_mtime_ns
    again = studio.client.get(f"/api/runs/{run['id']}/model")
    assert again.content == answer.content and exported.stat().st_mtime_ns == written


@pytest.mark.parametrize("path, status, words", [
    ("/api/runs/1/model?format=coreml", 400, "no 'coreml' download"),
    ("/api/runs/1/model?format=../../x", 400, "ask for format onnx"),
    ("/api/runs/99/model", 404, "no run 99"),
    ("/api/suggestions", 404, "start studio.py with --unlabelled FOLDER"),
])
def test_a_bad_download_or_suggestion_request_is_one_sentence(studio, path, status, words):
    answer = studio.client.get(path)
    assert answer.status_code == status and words in answer.json()["error"], answer.text


def test_after_a_new_retrain_only_what_was_exported_of_an_older_run_downloads(studio):
    exported = studio.client.get("/api/runs").json()["runs"][-1]["id"]  # downloaded above
    assert retrained(studio.client)["status"] == "done"
    assert studio.client.get(f"/api/runs/{exported}/model").status_code == 200
    refused = studio.client.get(f"/api/runs/{exported}/model", params={"format": "torchscript"})
    assert refused.status_code == 409 and "Only the latest run" in refused.json()["error"]


@pytest.mark.parametrize("runs, words", [
    ([], "No run has ended yet"),
    ([{"id": 1, "status": "running"}], "still training"),
    ([{"id": 1, "status": "failed"}], "failed, so it has no model"),
    ([{"id": 1, "status": "done", "earlier": True}], "before the studio last started"),
    ([{"id": 1, "status": "done"}, {"id": 2, "status": "running"}], "not the latest"),
])
def test_a_run_whose_model_is_not_in_memory_is_refused_in_one_sentence(runs, words):
    from flower_classifier.serve.answers import BadRequest
    from flower_classifier.studio.ship import Shipper

    trainer = SimpleNamespace(studio=None, runs_json=lambda: runs, latest=None)
    with pytest.raises(BadRequest) as refused:
        Shipper(trainer).model_file(1, "onnx")
    assert refused.value.status == 409 and words in str(refused.value)


def test_a_missing_exporter_is_one_sentence_naming_its_install(monkeypatch):
    from flower_classifier.export.formats import EXPORTERS
    from flower_classifier.serve.answers import BadRequest
    from flower_classifier.studio.ship import Shipper

    monkeypatch.setitem(EXPORTERS, "onnx", ("onnx_not_installed", "pip install onnx"))
    trainer = SimpleNamespace(studio=None, runs_json=list)
    with pytest.raises(BadRequest) as refused:
        Shipper(trainer).model_file(1, "onnx")
    assert refused.value.status == 501 and str(refused.value) == (
        "The .onnx download needs the onnx_not_installed package, which is not installed; pip "
        "install onnx.")


@pytest.mark.parametrize("flags, reason", [
    ("--save_dir elsewhere", "cannot set --save_dir: the studio gives it"),
    ("--epochs zero", "argument --epochs: invalid"), ("--bogus", "unrecognized arguments"),
    ("'--epochs", "No closing quotation")])
def test_train_flags_that_train_py_refuses_or_the_studio_sets_are_one_line(flags, reason,
                                                                          folder, tmp_path):
    refused = run_command("studio.py", folder, "--save_dir", tmp_path, f"--train_flags={flags}")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: --train_flags") and reason in refused.stderr
    assert not any(tmp_path.iterdir())  # refused before the folder was read


def test_every_flag_the_studio_gives_train_py_is_refused_in_train_flags(tmp_path):
    """STUDIO_TRAIN_FLAGS is kept by hand: each flag final.train_command sets must be in it, or
    --train_flags could give train.py that flag twice."""
    import torch

    from flower_classifier.cli.studio import STUDIO_TRAIN_FLAGS
    from flower_classifier.studio.final import train_command

    (tmp_path / MANIFEST).write_text("{}")
    given = set()
    for cache in (tmp_path / "cache", None):
        options = SimpleNamespace(data_dir=tmp_path, arch="efficientnet_lite0", workers=0,
                                  cache_dir=cache, category_names="names.json", train_flags=())
        studio = SimpleNamespace(options=options, save_dir=tmp_path,
                                 corrections_path=tmp_path / "corrections.json")
        command = train_command(studio, torch.device("cuda"), tmp_path / "final")
        given |= {str(part) for part in command if str(part).startswith("--")}
    assert {"--split_from", "--no_cache", "--cache_dir", "--gpu"} <= given
    assert given <= set(STUDIO_TRAIN_FLAGS)


def test_off_loopback_the_token_is_required(folder, cache_dir, tmp_path):
    refused = run_script("studio.py", folder, "--host", "0.0.0.0", "--port", "0", timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: --host 0.0.0.0") and "--token" in refused.stderr
    server = Studio(folder, tmp_path / "save", cache_dir, "--host", "0.0.0.0", "--token", TOKEN,
                    url_host="127.0.0.1")
    try:
        assert server.client.get("/").status_code == 200  # the page, which asks for the token
        for path in ["/api/state", "/api/decisions", "/api/photos/0/thumb", "/api/thumbs?ids=0",
                     "/api/runs", "/api/corrections", "/api/runs/1/model"]:
            assert server.client.get(path).status_code == 401, path
            wrong = server.client.get(path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
        authorised = {"Authorization": f"Bearer {TOKEN}"}
        assert server.client.get("/api/state", headers=authorised).status_code == 200
        assert server.client.post("/api/decisions", json={"decisions": [
            {"id": 1, "label": None}]}).status_code == 401
    finally:
        server.stop()


def test_apply_to_folders_moves_only_when_asked_and_undo_puts_back(cache_dir, tmp_path):
    folder = make_folder(tmp_path / "photos")
    before = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.jpg"))
    server = Studio(folder, tmp_path / "save", cache_dir)
    try:
        state = server.client.get("/api/state").json()
        copy = ids(state, "copy_of_primrose.jpg")[0]
        first = next(i for i, photo in enumerate(state["photos"]) if photo[0] == 0)
        server.client.post("/api/decisions", json={"decisions": [
            {"id": copy, "label": None}, {"id": first, "label": "10"}]})
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg")) == before
        applied = server.client.post("/api/apply-to-folders").json()
        assert applied["moved"] == 2 and "Restart" in applied["message"]
        assert (tmp_path / "save" / "set_aside" / "2" / "copy_of_primrose.jpg").is_file()
        assert (folder / "10" / state["photos"][first][2]).is_symlink()
        assert server.client.post("/api/apply-to-folders").status_code == 409
        assert server.client.post("/api/undo-folders").json()["moved_back"] == 2
    finally:
        server.stop()
    assert sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.jpg")) == before
