"""studio.py as a client sees it: the real server in a subprocess on a loopback port, real HTTP
(httpx, and raw sockets where a client must not tidy the path), on a small folder of real
photos with a planted duplicate and a planted link to a file that is no photo."""
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

import httpx
import pytest
from conftest import PROJECT, link_class_folders, run_script

CLASSES = ("1", "10", "2")
NAMES = {"1": "pink primrose", "10": "globe thistle", "2": "hard-leaved pocket orchid"}
TOKEN = "studio-secret"


def make_folder(root):
    """3 classes x 8 real photos (links), a copy of class 1's first photo filed under class 2,
    a link named like a photo that leads to /etc/passwd, and cat_to_name.json."""
    folder = link_class_folders(root, 8, CLASSES)
    first = sorted((folder / "1").iterdir())[0]
    shutil.copyfile(first.resolve(), folder / "2" / "copy_of_primrose.jpg")
    (folder / "10" / "secret.jpg").symlink_to("/etc/passwd")
    (folder / "cat_to_name.json").write_text(json.dumps(NAMES))
    return folder


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
    server = Studio(folder, tmp_path_factory.mktemp("studio_save"), cache_dir)
    yield server
    server.stop()


def ids(state, name):
    return [index for index, photo in enumerate(state["photos"]) if photo[2] == name]


def test_the_state_names_classes_and_finds_the_planted_problems(studio):
    state = studio.client.get("/api/state").json()
    assert [row["name"] for row in state["classes"]] == [NAMES[c] for c in CLASSES]
    assert sum(row["total"] for row in state["classes"]) == len(state["photos"]) == 26
    copy, secret = ids(state, "copy_of_primrose.jpg")[0], ids(state, "secret.jpg")[0]
    groups = state["findings"]["exact_duplicates"]
    assert any(copy in group["ids"] and len(group["ids"]) == 2 for group in groups)
    assert secret in state["findings"]["unreadable"]
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
    assert len(list((folder / "1").iterdir())) == 8  # nothing moved


@pytest.mark.parametrize("route", ["thumb", "image", "heatmap"])
def test_every_file_serving_route_answers_a_path_with_404(studio, route):
    state = studio.client.get("/api/state").json()
    secret = ids(state, "secret.jpg")[0]
    for photo in ["../../../../etc/passwd", "..%2f..%2f..%2fetc%2fpasswd", "%2fetc%2fpasswd",
                  "/etc/passwd", "-1", "26", "999999", "0x1", str(secret)]:
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
            for photo in range(first, 26, 2):
                answer = client.post("/api/decisions",
                                     json={"decisions": [{"id": photo, "label": "2"}]})
                assert answer.status_code == 200

    clients = [threading.Thread(target=decide, args=(first,)) for first in (0, 1)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    decisions = studio.client.get("/api/decisions").json()["decisions"]
    assert set(decisions) >= {str(photo) for photo in range(26)}
    forget = [{"id": photo, "forget": True} for photo in range(26)]
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


def test_the_quick_retrain_applies_the_decisions_and_reports_valid_accuracy(studio):
    assert studio.client.post("/api/decisions", json={"decisions": [
        {"id": 0, "label": None}]}).status_code == 200
    assert studio.client.post("/api/retrain").status_code == 202
    deadline = time.monotonic() + 120
    while (run := studio.client.get("/api/runs").json()["runs"][-1])["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert run["status"] == "done", run
    assert 0 <= run["valid_accuracy"] <= 1 and len(run["history"]) == run["epochs"]
    assert run["changes"]["dropped"] == 1
    heatmap = studio.client.get("/api/photos/20/heatmap")
    assert heatmap.status_code == 200 and heatmap.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_off_loopback_the_token_is_required(folder, cache_dir, tmp_path):
    refused = run_script("studio.py", folder, "--host", "0.0.0.0", "--port", "0", timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: --host 0.0.0.0") and "--token" in refused.stderr
    server = Studio(folder, tmp_path / "save", cache_dir, "--host", "0.0.0.0", "--token", TOKEN,
                    url_host="127.0.0.1")
    try:
        assert server.client.get("/").status_code == 200  # the page, which asks for the token
        for path in ["/api/state", "/api/decisions", "/api/photos/0/thumb", "/api/runs",
                     "/api/corrections"]:
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
