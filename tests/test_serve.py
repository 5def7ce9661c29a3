"""serve.py as a client sees it: the real server in a subprocess on a loopback port, real HTTP."""
import dataclasses
import io
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from conftest import FLOWERS, PROJECT, run_script

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Server:
    """serve.py on a free loopback port; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, checkpoint, *extra):
        self.process = subprocess.Popen(
            [sys.executable, "serve.py", str(checkpoint), "--port", "0", *map(str, extra)],
            cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self._read_line(timeout=120)
        match = re.search(r"http://([\d.]+):(\d+)/", line)
        assert match, f"no address in {line!r}; stderr: {self.process.stderr.read()}"
        self.host, self.port = match[1], int(match[2])
        self.url = match[0]
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self._wait_healthy()

    def _read_line(self, timeout):
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        return self.process.stdout.readline() if ready else ""

    def _wait_healthy(self):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("the server never answered /health")

    def stop(self):
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            self.process.kill()
            self.process.communicate()


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained[1] / "checkpoint.pth"


@pytest.fixture(scope="module")
def server(checkpoint):
    server = Server(checkpoint, "--category_names", FLOWERS / "cat_to_name.json", "--token", TOKEN,
                    "--max_upload_mb", 2, "--max_batch", 4, "--engine", "torch")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def photos(subset):
    return sorted((subset / "test").rglob("*.jpg"))


@pytest.fixture(scope="module")
def predictor(checkpoint):
    from flower_classifier.data.class_names import load_category_names
    from flower_classifier.inference.predictor import Predictor

    return Predictor(checkpoint, category_names=load_category_names(FLOWERS / "cat_to_name.json"))


def post_photo(server, path, **kwargs):
    return server.client.post("/predict", files={"file": (path.name, path.read_bytes())},
                              headers=AUTH, **kwargs)


def assert_matches(answer, expected, top_k):
    assert answer["path"] == expected.path
    assert answer["classes"] == expected.classes[:top_k]
    assert answer["names"] == expected.names[:top_k]
    # batches of other sizes round differently in the last digits (x4 with temperature scaling)
    assert answer["probabilities"] == pytest.approx(expected.probabilities[:top_k], abs=1e-3)
    assert set(answer) == set(expected.as_json())


def test_predict_answers_like_the_predictor(server, predictor, photos):
    photo = photos[0]
    expected = predictor.predict_image(photo, top_k=3, path=photo.name)
    multipart = post_photo(server, photo, params={"top_k": 2})
    assert multipart.status_code == 200, multipart.text
    assert_matches(multipart.json(), expected, top_k=2)
    raw = server.client.post("/predict", content=photo.read_bytes(), headers=AUTH)
    assert raw.status_code == 200, raw.text
    assert_matches(raw.json(), dataclasses.replace(expected, path="upload"), top_k=3)  # 3 classes: the default 5 is clamped


def test_health_and_classes(server, predictor):
    health = server.client.get("/health")  # open without the token, for monitors
    assert health.status_code == 200 and health.json()["status"] == "ok"
    classes = server.client.get("/classes", headers=AUTH).json()
    assert classes == {"classes": list(predictor.classes), "names": list(predictor.names)}


def test_token_is_required(server, photos):
    assert server.client.get("/classes").status_code == 401
    missing = server.client.post("/predict", files={"file": ("a.jpg", photos[0].read_bytes())})
    wrong = server.client.post("/predict", files={"file": ("a.jpg", photos[0].read_bytes())},
                               headers={"Authorization": "Bearer guess"})
    for answer in (missing, wrong):
        assert answer.status_code == 401
        assert "token" in answer.json()["error"]
        assert answer.headers["www-authenticate"] == "Bearer"


def decompression_bomb():
    """A 2 KB PNG that would decode to 9500 x 9500 pixels, beyond Pillow's safety limit."""
    buffer = io.BytesIO()
    Image.new("1", (9500, 9500)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_UPLOADS = {  # case: (the request, given a real photo's bytes; status; words of the error)
    "not an image": (lambda photo: {"files": {"file": ("notes.jpg", b"words, not pixels")}}, 400,
                     "not an image"),
    "empty": (lambda photo: {"files": {"file": ("empty.jpg", b"")}}, 400, "empty"),
    "truncated": (lambda photo: {"files": {"file": ("cut.jpg", photo[: len(photo) // 2])}}, 400,
                  "truncated"),
    "decompression bomb": (lambda photo: {"files": {"file": ("bomb.png", decompression_bomb())}},
                           413, "pixels"),
    "wrong field name": (lambda photo: {"files": {"photo": ("a.jpg", photo)}}, 400,
                         "no field 'file'"),
    "text, not a file": (lambda photo: {"data": {"file": "a.jpg"}, "files": {"more": ("b", b"")}},
                         400, "holds text"),
    "url-encoded form": (lambda photo: {"data": {"file": "a.jpg"}}, 400, "multipart"),
    "over the limit": (lambda photo: {"content": b"\xff" * 2_500_000}, 413, "2 MB limit"),
    "bad top_k": (lambda photo: {"files": {"file": ("a.jpg", photo)}, "params": {"top_k": "0"}},
                  400, "top_k"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_upload_is_a_one_line_json_error(server, photos, case):
    request, status, phrase = BAD_UPLOADS[case]
    answer = server.client.post("/predict", headers=AUTH, **request(photos[0].read_bytes()))
    assert answer.status_code == status, answer.text
    assert list(answer.json()) == ["error"]
    message = answer.json()["error"]
    assert phrase in message and "\n" not in message and message.endswith(".")
    assert post_photo(server, photos[0]).status_code == 200  # and the server still works


def test_large_upload_is_refused_before_it_is_read(server):
    """A declared 100 MB upload is answered 413 after 64 KB; so is a chunked one without a size."""
    with socket.create_connection((server.host, server.port), timeout=30) as connection:
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                           b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                           b"Content-Length: 100000000\r\n\r\n" + b"\xff" * 65536)
        assert connection.recv(4096).startswith(b"HTTP/1.1 413 ")

    def chunks():
        for _ in range(100):
            yield b"\xff" * 1_000_000

    chunked = server.client.post("/predict", content=chunks(), headers=AUTH)
    assert chunked.status_code == 413 and "limit" in chunked.json()["error"]


def test_page_asks_for_the_token_then_names_the_photo_in_headless_chromium(server, predictor,
                                                                          photos, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        browser_missing(f"playwright is not installed ({error})")
    if not os.access(CHROMIUM, os.X_OK):
        browser_missing(f"{CHROMIUM} is missing (Debian package chromium)")
    photo = photos[-1]
    expected = predictor.predict_image(photo, top_k=5).names[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            viewport={"width": 390, "height": 844})  # a fresh profile and a phone's screen
        try:
            page = browser.new_page()
            page.goto(server.url)  # no #token=: the page must ask before any photo is sent
            page.wait_for_selector("#token-form", state="visible", timeout=30000)
            page.fill("#token", TOKEN)
            page.click("#token-form button")
            page.wait_for_selector("#token-form", state="hidden", timeout=30000)
            page.set_input_files("#picker", str(photo))
            page.wait_for_selector("body[data-state=done]", timeout=30000)
            headline = page.inner_text("#headline")
            rows = page.locator("#results li").count()
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert headline.startswith(expected) and rows == 3  # the subset has 3 classes
    assert (tmp_path / "page.png").stat().st_size > 0


def browser_missing(reason):
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test cannot run: {reason}")
    pytest.skip(reason)


def refuses_connections(server):
    try:
        socket.create_connection((server.host, server.port), timeout=5).close()
    except OSError:
        return True
    return False


def test_sigterm_lets_the_request_in_flight_finish(checkpoint, photos):
    """The rest of the upload is sent only once the server is seen shutting down (it no longer
    accepts connections) with the request in flight: no sleeps, no race."""
    server = Server(checkpoint, "--max_batch", 1, "--engine", "torch")
    data = photos[0].read_bytes()
    with socket.create_connection((server.host, server.port), timeout=30) as connection:
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
                           + data[:1000])
        wait_until(lambda: server.client.get("/health").json()["in_flight"] == 1)
        server.client.close()  # its idle connection would hold the shutdown up
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: refuses_connections(server))
        connection.sendall(data[1000:])
        answer = b"".join(iter(lambda: connection.recv(65536), b""))  # until the server closes
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"probabilities"' in answer
    assert server.process.wait(timeout=30) == 143  # SIGTERM's exit code, as for train.py
    server.stop()


def wait_until(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def test_all_interfaces_warns_prints_the_lan_address_and_ctrl_c_exits_130(checkpoint):
    from flower_classifier.serve import guards

    process = subprocess.Popen(
        [sys.executable, "serve.py", str(checkpoint), "--host", "0.0.0.0", "--port", "0",
         "--max_batch", "1", "--engine", "torch"], cwd=PROJECT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        warning = process.stderr.readline()
        line = process.stdout.readline()
        port = int(re.search(r":(\d+)/ ", line)[1])
        assert warning.startswith("warning: listening on 0.0.0.0:") and "--token" in warning
        assert f"http://{guards.lan_address()}:{port}/ " in line
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
        assert health.status_code == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
    finally:
        process.kill()
        process.communicate()


def test_negative_batch_wait_is_refused(capsys):
    import serve
    from flower_classifier.cli.runner import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(serve.main, serve.get_args_parser(), ["unused.pth", "--batch_wait_ms", "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --batch_wait_ms must be 0 or more, got -1.0\n"


def test_bad_checkpoint_is_one_line_before_serving(tmp_path):
    junk = tmp_path / "checkpoint.pth"
    junk.write_bytes(b"not a checkpoint")
    result = run_script("serve.py", junk, "--port", "0", timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "serving" not in result.stdout
