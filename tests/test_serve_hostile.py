"""serve.py against hostile clients: slow, idle, oversized, malformed and cross-site requests, a
failing or stuck model. The real app and uvicorn run in a thread of this process on a loopback
port (so the model can be held or failed on purpose); clients are real sockets and httpx."""
import contextlib
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from PIL import Image

from conftest import FLOWERS
from flower_classifier.cli.serve import config_from_args, get_args_parser
from flower_classifier.serve.answers import BadRequest
from flower_classifier.serve.app import create_app
from flower_classifier.serve.memory import MemoryBudget
from flower_classifier.serve.server import listen, uvicorn_config

GOOD_TIMEOUT = 60


class HeldPredictor:
    """The real Predictor, whose model pass can be held at a gate or made to raise."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.gate = threading.Event()
        self.gate.set()
        self.batch_sizes = []
        self.failure = None

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def outputs(self, images, job_size=None):
        self.batch_sizes.append(len(images))
        assert self.gate.wait(GOOD_TIMEOUT)
        if self.failure is not None:
            raise self.failure
        return self.predictor.outputs(images, job_size=job_size)


class ThreadServer:
    """serve.py's app under uvicorn with serve.py's protocol, in a thread, on 127.0.0.1."""

    def __init__(self, predictor, *flags):
        config = config_from_args(get_args_parser().parse_args(["unused.pth", *map(str, flags)]))
        self.app = create_app(predictor, config)
        sock = listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, config, log_config=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=GOOD_TIMEOUT)
        deadline = time.monotonic() + GOOD_TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline, "the server never started"
            time.sleep(0.01)

    def health(self):
        return self.client.get("/health").json()

    def wait_for(self, condition, timeout=GOOD_TIMEOUT):
        """Poll /health until condition(health) holds."""
        deadline = time.monotonic() + timeout
        while not condition(self.health()):
            assert time.monotonic() < deadline, f"never true; last /health: {self.health()}"
            time.sleep(0.01)

    def wait_for_connections(self, condition, timeout=GOOD_TIMEOUT):
        """Wait until condition(the open connections' protocols) holds, seen from inside."""
        deadline = time.monotonic() + timeout
        while not condition(list(self.server.server_state.connections)):
            assert time.monotonic() < deadline, "the connections never got there"
            time.sleep(0.01)

    def connect(self):
        return socket.create_connection(("127.0.0.1", self.port), timeout=GOOD_TIMEOUT)

    def stop(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(GOOD_TIMEOUT)


@pytest.fixture(scope="module")
def predictor(trained):
    from flower_classifier.data.class_names import load_category_names
    from flower_classifier.inference.predictor import Predictor

    return Predictor(trained[1] / "checkpoint.pth",
                     category_names=load_category_names(FLOWERS / "cat_to_name.json"),
                     engine="torch")


@pytest.fixture
def held(predictor):
    return HeldPredictor(predictor)


@pytest.fixture
def start(held):
    """start(*serve.py flags) -> a ThreadServer around the held predictor, stopped afterwards."""
    servers = []

    def start_server(*flags):
        servers.append(ThreadServer(held, "--max_batch", 4, *flags))
        return servers[-1]

    yield start_server
    held.gate.set()
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def photo(subset):
    return sorted((subset / "test").rglob("*.jpg"))[0].read_bytes()


def post(server, data, **kwargs):
    return server.client.post("/predict", files={"file": ("a.jpg", data)}, **kwargs)


def head(path="/predict", length=None, extra=b""):
    """The head of a raw POST on a loopback host."""
    lines = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n" % path.encode()
    if length is not None:
        lines += b"Content-Length: %d\r\n" % length
    return lines + extra + b"\r\n"


def read_until_closed(connection, limit_s):
    """Everything the server sends until it closes the connection, and how long that took."""
    start = time.monotonic()
    connection.settimeout(limit_s)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received, time.monotonic() - start


def stalled_upload(server, length=100_000, sent=1000):
    """A connection whose upload stopped after `sent` of `length` bytes."""
    connection = server.connect()
    connection.sendall(head(length=length) + b"\xff" * sent)
    return connection


def encoded(image, format="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def png(size, mode="RGB"):
    return encoded(Image.new(mode, size))


def test_slow_headers_and_idle_connections_are_closed(start):
    server = start("--header_timeout", 1)
    idle = server.connect()
    slow = server.connect()
    answered = server.connect()  # idle again after an answer on a kept-alive connection
    answered.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

    def trickle():
        with contextlib.suppress(OSError):  # closed by the server
            for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" * 10:
                slow.send(bytes([byte]))
                time.sleep(0.1)

    threading.Thread(target=trickle, daemon=True).start()
    for connection in (idle, slow, answered):
        received, seconds = read_until_closed(connection, limit_s=10)
        assert seconds < 5
        assert received.startswith(b"HTTP/1.1 200 ") if connection is answered else received == b""
        connection.close()
    assert server.client.get("/health").status_code == 200


def test_stalled_and_trickling_uploads_get_408(start):
    server = start("--request_timeout", 1)
    stalled = stalled_upload(server)
    trickling = server.connect()
    trickling.sendall(head(extra=b"Transfer-Encoding: chunked\r\n"))

    def trickle():
        with contextlib.suppress(OSError):  # closed by the server
            for _ in range(100):
                trickling.sendall(b"1\r\n\xff\r\n")
                time.sleep(0.1)

    threading.Thread(target=trickle, daemon=True).start()
    for connection in (stalled, trickling):
        answer, seconds = read_until_closed(connection, limit_s=10)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"took longer than 1 s" in answer
        assert seconds < 5
        connection.close()


def test_requests_beyond_max_in_flight_get_503_with_retry_after(start, photo):
    server = start("--max_in_flight", 1)
    stalled = stalled_upload(server)
    server.wait_for(lambda health: health["in_flight"] == 1)
    refused = post(server, photo)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "try again" in refused.json()["error"]
    stalled.close()
    server.wait_for(lambda health: health["in_flight"] == 0)
    assert post(server, photo).status_code == 200


def test_connection_cap_closes_the_oldest_idle_connection_then_refuses(start, photo):
    server = start("--max_connections", 3)
    idle = [server.connect() for _ in range(3)]
    server.wait_for_connections(lambda connections: len(connections) == 3)
    with httpx.Client(base_url=server.url, timeout=GOOD_TIMEOUT) as client:  # a 4th connection
        assert client.get("/health").status_code == 200
    received, _ = read_until_closed(idle[0], limit_s=10)
    assert received == b""  # the oldest idle one made room
    for connection in idle:
        connection.close()
    server.wait_for_connections(lambda connections: not connections)
    busy = [stalled_upload(server) for _ in range(3)]  # none can be closed to make room
    server.wait_for_connections(lambda connections: len(connections) == 3 and not any(
        connection.is_idle() for connection in connections))
    refused, _ = read_until_closed(server.connect(), limit_s=10)
    assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in refused
    for connection in busy:
        connection.close()
    server.wait_for_connections(lambda connections: not connections)
    assert post(server, photo).status_code == 200


def test_memory_budget_refuses_uploads_beyond_it_but_keeps_room_for_photos(start, photo):
    server = start("--memory_mb", 40)  # 20 MB for large uploads, the rest for small ones
    stalled = stalled_upload(server, length=9_000_000)  # holds 18 MB: body and its copy
    server.wait_for(lambda health: health["in_flight"] == 1)
    second = server.client.post("/predict", content=b"\xff" * 9_000_000)
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert post(server, photo).status_code == 200  # a small photo still fits
    stalled.close()
    alone_too_large = server.client.post("/predict", content=b"\xff" * 15_000_000)
    assert alone_too_large.status_code == 413 and "--memory_mb" in alone_too_large.json()["error"]


def test_whole_body_sent_before_reading_still_gets_the_413(start):
    """As Python's urllib and many phone HTTP stacks do: the answer, not a connection reset."""
    server = start("--max_upload_mb", 2, "--header_timeout", 1)  # then the drain ends
    with server.connect() as connection:
        connection.sendall(head(length=3_000_000) + b"\xff" * 3_000_000)
        answer, _ = read_until_closed(connection, limit_s=10)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"2 MB limit" in answer


def lookalike_form(size=20_000_000):
    """A form whose file is full of boundary look-alikes: slow for a byte-by-byte parser."""
    part = b"\r\n--B-x"
    body = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
            + part * (size // len(part)) + b"\r\n--B--\r\n")
    return body, {"Content-Type": "multipart/form-data; boundary=B"}


def test_boundary_lookalikes_are_refused_without_parsing(start):
    server = start("--max_upload_mb", 25)
    body, headers = lookalike_form()
    start_s = time.monotonic()
    answer = server.client.post("/predict", content=body, headers=headers)
    assert answer.status_code == 400 and "more than 8 parts" in answer.json()["error"]
    assert time.monotonic() - start_s < 20  # parsed byte by byte it took minutes under load


def eps():
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{ } loop\n%%EOF\n"


def ico_wrapping_a_large_png():
    """An ICO whose entry is a 20000x20000 PNG: the ICO decoder would decode it whole."""
    image = png((20000, 20000), "1")
    entry = bytes([0, 0, 0, 0, 1, 0, 32, 0]) + len(image).to_bytes(4, "little") + \
        (22).to_bytes(4, "little")
    return b"\0\0\1\0\1\0" + entry + image


def damaged_png():
    """A small PNG whose middle third is inverted: its header reads, its pixels do not."""
    data = bytearray(encoded(Image.effect_noise((64, 48), 60).convert("RGB")))
    middle = slice(len(data) // 3, 2 * len(data) // 3)
    data[middle] = bytes(byte ^ 0xFF for byte in data[middle])
    return bytes(data)


def damaged_heic():
    """A small HEIC without its last bytes: its boxes point past the end (a 500 before)."""
    return encoded(Image.effect_noise((64, 48), 60).convert("RGB"), "HEIF")[:-10]


MALFORMED = {  # case: (httpx request arguments, status, words of the error); PHOTO: the photo
    "top_k superscript two": ({"params": {"top_k": "²"}, "files": "PHOTO"}, 400, "top_k"),
    "top_k circled one": ({"params": {"top_k": "①"}, "files": "PHOTO"}, 400, "top_k"),
    "top_k of 5000 digits": ({"params": {"top_k": "9" * 5000}, "files": "PHOTO"}, 400, "top_k"),
    "EPS (Ghostscript)": ({"files": {"file": ("a.eps", eps())}}, 400, "not a JPEG"),
    "ICO around a large PNG": ({"files": {"file": ("a.ico", ico_wrapping_a_large_png())}}, 400,
                               "not a JPEG"),
    "PNG over the pixel limit": ({"files": {"file": ("a.png", png((9500, 9500), "1"))}}, 413,
                                 "pixels"),
    "damaged PNG": ({"files": {"file": ("a.png", damaged_png())}}, 400, "damaged"),
    "damaged HEIC": ({"files": {"file": ("a.heic", damaged_heic())}}, 400, "damaged"),
    "multipart without boundary": ({"content": b"x", "headers": {
        "Content-Type": "multipart/form-data"}}, 400, "boundary"),
    "broken multipart": ({"content": b"--B\r\nnot a header\r\n\r\n", "headers": {
        "Content-Type": "multipart/form-data; boundary=B"}}, 400, "cannot be read"),
}


@pytest.mark.parametrize("case", MALFORMED)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_malformed_requests_get_a_4xx_without_exception_text(start, photo, case):
    server = start()
    request, status, phrase = MALFORMED[case]
    if request.get("files") == "PHOTO":
        request = {**request, "files": {"file": ("a.jpg", photo)}}
    answer = server.client.post("/predict", **request)
    assert answer.status_code == status, answer.text
    message = answer.json()["error"]
    assert phrase in message and "\n" not in message and "Error" not in message
    assert post(server, photo).status_code == 200


def test_extreme_aspect_ratio_is_answered(start):
    server = start()
    answer = server.client.post("/predict", files={"file": ("strip.png", png((4000, 1)))})
    assert answer.status_code == 200, answer.text


def test_non_ascii_token_is_a_401(start, photo):
    server = start("--token", "sécret")
    with server.connect() as connection:
        connection.sendall(b"GET /classes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Authorization: Bearer \xc3\xa9\xff\r\n\r\n")
        assert connection.recv(65536).startswith(b"HTTP/1.1 401 ")
    good = server.client.get("/classes", headers={"Authorization": "Bearer sécret".encode()})
    assert good.status_code == 200


def test_content_length_with_transfer_encoding_is_refused_and_closed(start):
    server = start()
    with server.connect() as connection:
        connection.sendall(head(length=5, extra=b"Transfer-Encoding: chunked\r\n")
                           + b"5\r\nhello\r\n0\r\n\r\n")
        answer, _ = read_until_closed(connection, limit_s=10)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"connection: close" in answer.lower()


def test_only_this_machines_names_and_origins_are_served(start, photo):
    server = start("--allow_origin", "https://photos.example.org")
    rebound = server.client.get("/health", headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 403 and "--allow_origin" in rebound.json()["error"]
    cross_site = post(server, photo, headers={"Origin": "https://attacker.example"})
    assert cross_site.status_code == 403 and "attacker.example" in cross_site.json()["error"]
    for allowed in ({"Origin": server.url}, {"Origin": "https://photos.example.org"},
                    {"Host": "localhost"}, {"Host": "photos.example.org"}):
        assert post(server, photo, headers=allowed).status_code == 200, allowed
    page = server.client.get("/")
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_model_failure_is_a_500_logged_once_without_its_text(start, held, photo, caplog):
    server = start()  # uvicorn's loggers propagate to caplog's (log_config=None)
    held.failure = RuntimeError("secret detail in /home/someone/model.bin")
    answer = post(server, photo)
    assert answer.status_code == 500
    assert "secret" not in answer.text and "model.bin" not in answer.text
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert len(tracebacks) == 1 and "secret detail" in str(tracebacks[0].exc_info[1])
    held.failure = None
    assert post(server, photo).status_code == 200


def test_stuck_model_makes_health_unhealthy_and_requests_answer_503(start, held, photo):
    server = start("--request_timeout", 1)
    held.gate.clear()
    answer = post(server, photo)
    assert answer.status_code == 503 and "within 1 s" in answer.json()["error"]
    server.wait_for(lambda health: health["status"] != "ok")
    stuck = server.client.get("/health")
    assert stuck.status_code == 503 and "running one batch" in stuck.json()["status"]
    held.gate.set()
    server.wait_for(lambda health: health["status"] == "ok")


class Fatal(BaseException):
    """Not an Exception: escapes the batcher's handler and ends its task."""


def test_dead_batcher_is_reported_and_requests_do_not_hang(start, held, photo):
    server = start("--request_timeout", 1)
    held.failure = Fatal()
    first = post(server, photo)
    assert first.status_code == 503
    health = server.client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "the model worker stopped"
    later = post(server, photo)
    assert later.status_code == 503 and "restart the server" in later.json()["error"]


def test_waiting_requests_share_batches_of_at_most_max_batch(start, held, predictor, subset):
    """The model is held on a first image until six more wait: they go in batches of 4 and 2."""
    photos = sorted((subset / "test").rglob("*.jpg"))[:6]
    server = start("--batch_wait_ms", 0)
    held.gate.clear()
    with ThreadPoolExecutor(7) as pool:
        first = pool.submit(post, server, photos[0].read_bytes())
        server.wait_for(lambda health: health["in_flight"] == 1 and health["queued"] == 0
                        and held.batch_sizes == [1])
        answers = [pool.submit(post, server, path.read_bytes()) for path in photos]
        server.wait_for(lambda health: health["queued"] == 6)
        held.gate.set()
        assert first.result().status_code == 200
        answers = [answer.result() for answer in answers]
    assert held.batch_sizes == [1, 4, 2]
    for path, answer in zip(photos, answers):
        expected = predictor.predict_image(path, top_k=3, path="a.jpg")
        assert answer.status_code == 200 and answer.json()["classes"] == expected.classes


def test_a_timed_out_requests_share_is_given_back_and_takes_no_more():
    """A decoding thread still running after its request timed out cannot leak memory shares."""
    budget = MemoryBudget(40e6)
    with budget.account() as share:
        share.take(10_000_000)
        assert budget.used == 10_000_000
    assert budget.used == 0
    with pytest.raises(BadRequest) as refused:
        share.take(1000)
    assert refused.value.status == 503 and budget.used == 0


@pytest.mark.parametrize("size_mb", [30, 3])
def test_urllib_posting_over_the_limit_reads_the_413(start, size_mb):
    """urllib.request sends the whole body before it reads: over --max_upload_mb (by the
    Content-Length alone, or by a body a bit over) it must read the JSON 413, not a reset."""
    import json
    import urllib.error
    import urllib.request

    server = start("--max_upload_mb", 2)
    request = urllib.request.Request(f"{server.url}/predict", data=b"\xff" * size_mb * 1_000_000,
                                     headers={"Content-Type": "image/jpeg"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=GOOD_TIMEOUT)
    assert refused.value.code == 413
    assert "2 MB limit" in json.loads(refused.value.read())["error"]


def test_a_boundary_over_70_characters_is_a_400_naming_it(start, photo):
    server = start()
    boundary = "b" * 300
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\""
            f"\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    answer = server.client.post("/predict", content=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert answer.status_code == 400
    assert "boundary is 300 characters long" in answer.json()["error"]
    assert "70" in answer.json()["error"]
