"""Serve the classifier to phones and programs: a web page and an HTTP API on one port.

    python serve.py checkpoints/checkpoint.pth --category_names cat_to_name.json
    python serve.py checkpoints/checkpoint.pth --host 0.0.0.0 --token SECRET   # phones on the Wi-Fi
    curl -F file=@photo.jpg 'http://127.0.0.1:8000/predict?top_k=3'

`GET /` is the page (take or pick a photo, see the top names with bars); `POST /predict` takes a
multipart field `file` or the raw image bytes and answers predict.py --json's object; `GET
/health` and `GET /classes` describe the model. Concurrent requests share one model batch: images
are decoded in threads, never on the event loop, and a worker thread runs the model on whatever
requests are waiting, pausing up to --batch_wait_ms for requests still being decoded.

On a hostile network nothing a client sends can kill, hang or starve it: request headers must
arrive within --header_timeout and a whole request within --request_timeout; open connections,
requests in flight and the memory held for uploads and decoded pixels are capped (503 with
Retry-After when full); only the Host names and web-page origins of this machine are served.
"""
import argparse
import asyncio
import contextlib
import ctypes
import functools
import hmac
import io
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from python_multipart.multipart import FormParser, parse_options_header
import torch
import uvicorn
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from uvicorn.protocols.http.h11_impl import H11Protocol

from cli_utils import (
    HelpFormatter,
    add_gpu_argument,
    category_names_from_flag,
    positive_float,
    positive_int,
    run_cli,
    select_device,
)
from common import UserError, error_reason, warn
from data_utils import IMAGE_FORMATS, MAX_PIXELS, UNREADABLE_IMAGE_ERRORS, open_image, to_rgb
from engines import ENGINE_CHOICES
from predictor import Predictor

STATIC = Path(__file__).resolve().parent / "static"
# A server's job never ends: --engine auto chooses for it as for a large folder (OpenVINO on the
# CPU), however small each batch is.
SERVER_JOB_SIZE = math.inf
UPLOAD_FIELD = "file"
MAX_FORM_PARTS = 8  # a phone's form has one; more is not a photo upload
MAX_TOP_K_DIGITS = 6
M_ARENA_MAX = -8  # glibc's mallopt parameter
# Bytes held per upload byte: the body, then the copy the multipart parser or the decoder reads.
BODY_COPIES = 2
# Bytes held per decoded pixel: Pillow keeps RGB in 4 bytes, and rotation or conversion makes
# one more image of the same size before the first is freed.
DECODED_BYTES_PER_PIXEL = 8
# Memory only requests that hold less than this may use: a flood of large uploads cannot take
# the room that phone photos and API calls need.
SMALL_REQUEST_BYTES = 8_000_000
SMALL_REQUEST_RESERVE = 32_000_000
RETRY_AFTER_S = "1"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; "
     b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
]
BUSY_CONNECTION_TEXT = b"The server has too many connections.\n"
BUSY_CONNECTION_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: %s\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
    % (RETRY_AFTER_S.encode(), len(BUSY_CONNECTION_TEXT), BUSY_CONNECTION_TEXT))


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Serve a checkpoint as a web page for phones and an HTTP API.",
        formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pth written by train.py")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 lets "
                        "phones and computers on the same network reach it")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    parser.add_argument("--top_k", type=positive_int, default=5,
                        help="classes per answer when a request does not say (?top_k=)")
    parser.add_argument("--category_names", default=None,
                        help="JSON file mapping class folder names to names, e.g. cat_to_name.json "
                        "(default: show the folder names)")
    add_gpu_argument(parser)
    parser.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                        help="what runs the backbone: auto takes OpenVINO on the CPU where it is "
                        "installed (the server is one long job), else torch")
    parser.add_argument("--token", default=None, help="require `Authorization: Bearer TOKEN` on "
                        "/predict and /classes (default: no token)")
    parser.add_argument("--allow_origin", action="append", default=[], metavar="ORIGIN",
                        help="also serve web pages from ORIGIN (e.g. https://photos.example.org) "
                        "and requests naming its host; repeatable; '*' turns the Host and Origin "
                        "checks off (default: only this machine's addresses and names)")
    parser.add_argument("--max_upload_mb", type=positive_float, default=20,
                        help="largest upload accepted, in MB; larger ones get 413 unread")
    parser.add_argument("--memory_mb", type=positive_float, default=512,
                        help="most memory held at once for uploads and decoded images, in MB; "
                        "requests beyond it get 503, images that alone exceed it 413")
    parser.add_argument("--max_connections", type=positive_int, default=512,
                        help="most open connections; when full, the oldest idle one is closed, "
                        "else the new one gets 503")
    parser.add_argument("--max_in_flight", type=positive_int, default=64,
                        help="most /predict requests handled at once; more get 503")
    parser.add_argument("--header_timeout", type=positive_float, default=10,
                        help="seconds a connection may take to send a request's headers, or "
                        "stay idle, before it is closed")
    parser.add_argument("--request_timeout", type=positive_float, default=30,
                        help="seconds a request may take from its headers to its answer (upload "
                        "included): later uploads get 408, later answers 503")
    parser.add_argument("--max_batch", type=positive_int, default=16,
                        help="most images the model runs at once (start-up runs every size up "
                        "to it)")
    parser.add_argument("--batch_wait_ms", type=float, default=10,
                        help="longest wait for requests still being decoded to join a batch")
    return parser


class BadRequest(Exception):
    """A request the client can fix, or retry later: answered with its status and
    {"error": message}, plus headers (Retry-After, Connection: close) where they apply."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers


def busy(message):
    """A 503 that closes the connection: a body left unsent is not worth draining when full."""
    return BadRequest(503, message, {"Retry-After": RETRY_AFTER_S, "Connection": "close"})


class Batcher:
    """Runs the model on the images of concurrent requests together, in one worker thread.

    A batch starts with the oldest waiting image and takes every image already queued; while other
    requests are still decoding it waits up to `wait_s` for them, so one lone request never waits.
    """

    def __init__(self, predictor, max_batch, wait_s):
        self.predictor, self.max_batch, self.wait_s = predictor, max_batch, wait_s
        self.waiting = []  # (tensor, top_k, path, future) of preprocessed images, oldest first
        self.arrived = asyncio.Event()
        self.decoding = 0  # requests decoding an image now: they will be waiting soon
        self.batches = self.images = 0
        self.busy_since = None  # loop time the batch in the model thread began
        # The model thread keeps torch's threads (the cores); set explicitly, since the decoding
        # threads' set_num_threads(1) becomes the default of threads started after them.
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model",
                                               initializer=torch.set_num_threads,
                                               initargs=(torch.get_num_threads(),))
        self.worker = None

    def start(self):
        self.worker = asyncio.create_task(self._run())

    async def stop(self):
        self.worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.worker
        self.model_thread.shutdown()

    def problem(self, stuck_after):
        """Why the model cannot answer now, or None while it works."""
        if self.worker.done():
            return "the model worker stopped"
        now = asyncio.get_running_loop().time()
        busy_for = 0 if self.busy_since is None else now - self.busy_since
        if busy_for > stuck_after:
            return f"the model has been running one batch for {busy_for:.0f} s"
        return None

    async def predict(self, tensor, top_k, path):
        """The Prediction of one preprocessed image, computed in a batch with its neighbours."""
        if self.worker.done():
            raise busy("The model worker stopped; restart the server.")
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((tensor, top_k, path, future))
        self.arrived.set()
        return await future

    async def _next_batch(self):
        loop = asyncio.get_running_loop()
        while not self.waiting:
            self.arrived.clear()
            await self.arrived.wait()
        deadline = loop.time() + self.wait_s
        while len(self.waiting) < self.max_batch and self.decoding and loop.time() < deadline:
            self.arrived.clear()
            # asyncio.TimeoutError: on Python 3.10 wait_for raises it, not the builtin TimeoutError
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), deadline - loop.time())
        batch, self.waiting = self.waiting[:self.max_batch], self.waiting[self.max_batch:]
        return batch

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [item for item in batch if not item[3].done()]  # skip timed-out requests
            if not batch:
                continue
            self.busy_since = loop.time()
            try:
                predictions = await loop.run_in_executor(self.model_thread, self._predict, batch)
            except Exception as error:  # a model failure fails this batch, not the server
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            finally:
                self.busy_since = None
            self.batches += 1
            self.images += len(batch)
            for (*_, future), prediction in zip(batch, predictions):
                if not future.done():
                    future.set_result(prediction)

    def _predict(self, batch):
        """One model pass over the batch; each request keeps its own top_k. The server is one
        long job, so "auto" takes the engine of large jobs (OpenVINO on the CPU)."""
        tensors, top_ks, paths, _ = zip(*batch)
        outputs = self.predictor.outputs(torch.stack(tensors), job_size=SERVER_JOB_SIZE)
        return self.predictor.top(outputs, list(top_ks), list(paths))


class MemoryBudget:
    """Bytes the server holds for requests (upload bodies, decoded pixels), shared by the event
    loop and the decoding threads: a request that would pass the total gets 503 instead of
    growing the process. Past SMALL_REQUEST_BYTES a request may not use the last
    SMALL_REQUEST_RESERVE, so small photos always find room beside a flood of large uploads."""

    def __init__(self, total):
        self.total, self.used = int(total), 0
        self.large_total = max(self.total - SMALL_REQUEST_RESERVE, self.total // 2)
        self.lock = threading.Lock()

    def take(self, share, size):
        """Reserve size more bytes for share's request, or raise BadRequest."""
        total = self.total if share.held + size <= SMALL_REQUEST_BYTES else self.large_total
        if share.held + size > total:
            raise BadRequest(413, "The upload needs more memory than this server gives one "
                             "request (--memory_mb); send a smaller photo.")
        with self.lock:
            if share.closed or self.used + size > total:  # closed: its request timed out
                raise busy("The server is busy with other uploads; try again in a moment.")
            self.used += size
            share.held += size

    @contextlib.contextmanager
    def account(self):
        """A request's share, given back when the block ends; a decoding thread still running
        for it then can take no more."""
        share = Share(self)
        try:
            yield share
        finally:
            with self.lock:
                self.used -= share.held
                share.held, share.closed = 0, True


class Share:
    """What one request holds of a MemoryBudget."""

    def __init__(self, budget):
        self.budget, self.held, self.closed = budget, 0, False

    def take(self, size):
        self.budget.take(self, size)


def form_file(body, content_type):
    """(bytes, file name) of the multipart field `file`, parsed with python-multipart in the
    calling (decoding) thread. Bodies with more delimiters than MAX_FORM_PARTS are refused
    before parsing: that many delimiters only slow the parser down."""
    content_type, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    fix = f"send the photo as the form field '{UPLOAD_FIELD}'."
    if not boundary:
        raise BadRequest(400, f"The multipart form has no boundary in its Content-Type; {fix}")
    if body.count(b"\r\n--" + boundary) > MAX_FORM_PARTS:
        raise BadRequest(400, f"The multipart form has more than {MAX_FORM_PARTS} parts; {fix}")
    fields, files = [], []
    parser = FormParser(
        "multipart/form-data", fields.append, files.append, boundary=boundary,
        # read_body refused bodies over --max_upload_mb already: the whole body fits in memory
        config={"MAX_MEMORY_FILE_SIZE": len(body) + 1, "MAX_BODY_SIZE": len(body) + 1})
    try:
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError):
        raise BadRequest(400, f"The multipart form cannot be read; {fix}") from None
    for part in files:
        if part.field_name == UPLOAD_FIELD.encode():
            name = (part.file_name or b"upload").decode("utf-8", "replace")[:255]
            file = part.file_object
            file.seek(0)
            return file.read(), name
    if any(field.field_name == UPLOAD_FIELD.encode() for field in fields):
        raise BadRequest(400, f"The form field '{UPLOAD_FIELD}' holds text, not a file; send the "
                         f"photo as a file upload, as `curl -F {UPLOAD_FIELD}=@photo.jpg` does.")
    names = [(part.field_name or b"").decode("utf-8", "replace")[:40] for part in fields + files]
    raise BadRequest(400, f"The form has no field '{UPLOAD_FIELD}' (fields: "
                     f"{', '.join(names) or 'none'}); {fix}")


def decode_upload(body, content_type, predictor, share):
    """(preprocessed tensor, file name) of the upload, or a BadRequest saying what is wrong with
    it. Runs in a decoding thread: form parsing and pixels never block the event loop."""
    data, name = body, "upload"
    if content_type.startswith("multipart/form-data"):
        data, name = form_file(body, content_type)
    if not data:
        raise BadRequest(400, "The upload is empty; send a photo such as a JPEG or PNG file.")
    try:
        with open_image(io.BytesIO(data), predictor.preprocess.resize) as image:
            share.take(image.width * image.height * DECODED_BYTES_PER_PIXEL)
            rgb = to_rgb(image)
    except Image.DecompressionBombError:
        raise BadRequest(413, f"The image has more pixels than the {MAX_PIXELS} this server "
                         "decodes; send a smaller photo.") from None
    except UNREADABLE_IMAGE_ERRORS as error:
        raise BadRequest(400, f"The upload is not an image that can be read "
                         f"({unreadable_reason(error)}); send a photo such as a JPEG or PNG "
                         "file.") from None
    return predictor.transform(rgb), name


def unreadable_reason(error):
    """What is wrong with an unreadable upload, in the server's words: a decoder's own message
    is not for clients."""
    if isinstance(error, UnidentifiedImageError):
        return f"not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image"
    return "the file is truncated" if "truncated" in str(error) else "the file is damaged"


async def read_body(request, limit, share):
    """The request body, refused with 413 as soon as it is known to exceed limit bytes; the
    memory it needs is taken from share as it arrives."""
    too_large = BadRequest(413, f"The upload is larger than the {limit / 1e6:g} MB limit; send a "
                           "smaller photo (the server's --max_upload_mb sets the limit).")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest(400, "The Content-Length header is not a number; send the photo "
                             "again.", {"Connection": "close"})
        if int(declared) > limit:
            raise too_large
        share.take(int(declared) * BODY_COPIES)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            if declared is None:
                share.take(len(chunk) * BODY_COPIES)
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to read the answer; it only must not log a crash
        raise BadRequest(400, "The upload was cut off before its end; send it again.") from None
    return b"".join(chunks)


def requested_top_k(request, default):
    text = request.query_params.get("top_k")
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_TOP_K_DIGITS or int(text) < 1:
        raise BadRequest(400, f"top_k must be a whole number of at least 1, got {text[:20]!r}.")
    return int(text)


def error_response(status, message, headers=None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def local_names(host):
    """Host names and addresses that mean this machine: a Host header naming anything else comes
    from a DNS-rebinding page or a misdirected client."""
    names = {"localhost", "127.0.0.1", "::1", host.lower()}
    hostname = socket.gethostname().lower()
    names |= {hostname, f"{hostname}.local", socket.getfqdn().lower()}
    with contextlib.suppress(OSError):
        names |= {info[4][0] for info in socket.getaddrinfo(hostname, None)}
    if host in ("0.0.0.0", "::"):
        names.add(lan_address())
    return names


def host_name(authority):
    """The host part of a Host header or origin's authority, lower case, without port or []."""
    host = authority.rsplit("@", 1)[-1].lower()
    if host.startswith("["):
        return host[1:host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Gatekeeper:
    """ASGI middleware that serves only this machine's Host names and pages of its own origin
    (as Jupyter Server does, against DNS rebinding and cross-site posts), refuses requests with
    both Content-Length and Transfer-Encoding (RFC 9112 request smuggling), adds the security
    headers to every answer and turns a bug into a logged 500 that keeps the connection."""

    def __init__(self, app, bound_host, allowed_origins):
        self.app = app
        self.open_to_all = "*" in allowed_origins
        self.origins = {origin.rstrip("/").lower() for origin in allowed_origins}
        self.names = local_names(bound_host) | {host_name(urlsplit(origin).netloc)
                                                for origin in self.origins}
        self.any_address = bound_host in ("0.0.0.0", "::")

    def refusal(self, scope):
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        if "content-length" in headers and "transfer-encoding" in headers:
            return 400, ("The request has both Content-Length and Transfer-Encoding; send only "
                         "one.")
        if self.open_to_all:
            return None
        host = headers.get("host", "")
        if not self.is_local(host_name(host)):
            return 403, (f"This server does not answer to the name {host[:80]!r}; use its address, "
                         "or start it with --allow_origin for that name.")
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.origins | {
                f"{scope.get('scheme', 'http')}://{host}".lower()}:
            return 403, (f"Requests from the web page at {origin[:80]!r} are refused; start the "
                         "server with --allow_origin for it.")
        return None

    def is_local(self, name):
        if name in self.names:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        # An address, not a name, cannot be rebound; only a loopback one or, when listening on
        # every interface, any address a client used to reach this machine.
        return address.is_loopback or self.any_address

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            status, text = refusal
            answer = error_response(status, text, {"Connection": "close"})
            return await answer(scope, receive, send_with_headers)
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if started:
                raise  # too late for an answer: uvicorn logs it and closes the connection
            # A bug: logged once, with its traceback; the answer carries no exception text.
            logging.getLogger("uvicorn.error").exception("request %s %s failed",
                                                         scope["method"], scope["path"])
            answer = error_response(500, "The server failed on this request; try again, and "
                                    "report it if it keeps failing.")
            await answer(scope, receive, send_with_headers)


class GuardedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus what it lacks against slow and idle clients: a connection
    must send a request's headers within header_timeout of opening or of its last answer, and
    past max_connections the oldest idle connection is closed for a new one (503 when none is
    idle). A body left unread after an early answer (413) is drained until that timeout, so a
    client that sends everything before reading still gets the answer, not a reset."""

    def __init__(self, *args, header_timeout, max_connections, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.header_timer = None
        self.idle_since = time.monotonic()

    def is_idle(self):
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport):
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._close_oldest_idle():
            transport.write(BUSY_CONNECTION_ANSWER)
            transport.close()
            return
        self._await_headers()

    def _close_oldest_idle(self):
        idle = [connection for connection in self.connections if connection is not self
                and isinstance(connection, GuardedProtocol) and connection.is_idle()]
        if not idle:
            return False
        min(idle, key=lambda connection: connection.idle_since).transport.close()
        return True

    def _await_headers(self):
        if self.header_timer is not None:
            self.header_timer.cancel()
        self.idle_since = time.monotonic()
        self.header_timer = self.loop.call_later(self.header_timeout, self._close_if_idle)

    def _close_if_idle(self):
        self.header_timer = None
        if self.is_idle():
            self.transport.close()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc):
        if self.header_timer is not None:
            self.header_timer.cancel()
        super().connection_lost(exc)


def create_app(predictor, top_k=5, token=None, max_upload_mb=20.0, max_batch=16, batch_wait_ms=10.0,
               decode_threads=None, memory_mb=512.0, max_in_flight=64, request_timeout=30.0,
               bound_host="127.0.0.1", allowed_origins=()):
    """The Starlette app: the page, /predict, /health and /classes around one Batcher.
    decode_threads (default: the cores) parse forms, decode and preprocess uploads."""
    limit = int(max_upload_mb * 1e6)
    batcher = Batcher(predictor, max_batch, batch_wait_ms / 1000)
    budget = MemoryBudget(memory_mb * 1e6)
    in_flight = 0
    # One torch thread each: their small tensor ops must not compete with the model's threads.
    decoders = ThreadPoolExecutor(decode_threads or os.cpu_count() or 1,
                                  thread_name_prefix="decode", initializer=torch.set_num_threads,
                                  initargs=(1,))

    def check_token(request):
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Starlette decodes headers as latin-1: encoding back gives the bytes sent, any bytes.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("latin-1"), token.encode()):
            raise BadRequest(401, "A valid token is required; send the header "
                             "'Authorization: Bearer TOKEN' with the server's --token.",
                             {"WWW-Authenticate": "Bearer"})

    async def answer(request, share, uploading):
        k = min(requested_top_k(request, top_k), len(predictor.classes))
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/x-www-form-urlencoded"):
            raise BadRequest(400, f"Send the photo as multipart/form-data field '{UPLOAD_FIELD}' "
                             "or as the raw request body, not URL-encoded.")
        body = await read_body(request, limit, share)
        uploading.clear()  # the upload is in: a timeout from here on is the server's
        batcher.decoding += 1
        try:
            tensor, name = await asyncio.get_running_loop().run_in_executor(
                decoders, decode_upload, body, content_type, predictor, share)
        finally:
            batcher.decoding -= 1
        del body  # its memory is free before the model runs
        return await batcher.predict(tensor, k, name)

    async def predict(request):
        nonlocal in_flight
        check_token(request)
        if in_flight >= max_in_flight:
            raise busy("The server is answering as many requests as it takes; try again in a "
                       "moment.")
        in_flight += 1
        uploading = asyncio.Event()
        uploading.set()
        try:
            with budget.account() as share:
                prediction = await asyncio.wait_for(answer(request, share, uploading),
                                                    request_timeout)
        except asyncio.TimeoutError:
            if uploading.is_set():
                raise BadRequest(408, f"The upload took longer than {request_timeout:g} s; send "
                                 "it again on a faster connection.",
                                 {"Connection": "close"}) from None
            raise busy(f"The server could not answer within {request_timeout:g} s; try again "
                       "in a moment.") from None
        finally:
            in_flight -= 1
        return JSONResponse(prediction.as_json())

    async def health(request):
        problem = batcher.problem(stuck_after=request_timeout)
        return JSONResponse({"status": problem or "ok", "classes": len(predictor.classes),
                             "batches": batcher.batches, "images": batcher.images,
                             "in_flight": in_flight, "queued": len(batcher.waiting),
                             "token_required": token is not None},
                            status_code=503 if problem else 200)

    async def classes(request):
        check_token(request)
        return JSONResponse({"classes": list(predictor.classes), "names": list(predictor.names)})

    async def page(request):
        return FileResponse(STATIC / "index.html")

    async def bad_request(request, error):
        return error_response(error.status, str(error), error.headers)

    async def http_error(request, error):
        return error_response(error.status_code, f"{error.detail}.", error.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown()

    routes = [Route("/", page), Route("/predict", predict, methods=["POST"]),
              Route("/health", health), Route("/classes", classes),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    gate = Middleware(Gatekeeper, bound_host=bound_host, allowed_origins=list(allowed_origins))
    return Starlette(routes=routes, lifespan=lifespan, middleware=[gate], exception_handlers={
        BadRequest: bad_request, HTTPException: http_error})


def app_from_args(predictor, args):
    return create_app(predictor, args.top_k, args.token, args.max_upload_mb, args.max_batch,
                      args.batch_wait_ms, memory_mb=args.memory_mb,
                      max_in_flight=args.max_in_flight, request_timeout=args.request_timeout,
                      bound_host=args.host, allowed_origins=args.allow_origin)


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def lan_address():
    """This machine's address on its local network, for the phone (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
        except OSError:
            return socket.gethostname()


def listen(host, port):
    """The listening socket, opened before serving so a busy port is a one-line error. Its proto
    is IPPROTO_TCP because asyncio sets TCP_NODELAY only on such sockets' connections: without it
    every answer on a kept-alive connection waits about 40 ms for a delayed ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({error_reason(error)}); choose another "
                        "--port or --host") from None
    return sock


def load_predictor(args):
    """The Predictor, its backbone engine run twice on every batch size up to --max_batch: the
    first runs of a new size compile and allocate (measured with the traced torch backbone:
    250 MB up to 16), which no request should pay for, nor show as growing memory."""
    category_names = category_names_from_flag(args.category_names)
    predictor = Predictor(args.checkpoint, select_device(args.gpu), category_names, args.engine)
    blank = predictor.transform(Image.new("RGB", (predictor.preprocess.crop,) * 2))
    for size in [*range(1, args.max_batch + 1)] * 2:
        predictor.outputs(blank.expand(size, -1, -1, -1), job_size=SERVER_JOB_SIZE)
    return predictor


def limit_malloc_arenas():
    """Two glibc malloc arenas instead of one per thread: uploads decoded in one thread and freed
    in another otherwise fragment the arenas, and memory grew by 100-200 MB over a few thousand
    requests (measured with benchmarks/serve_load.py); a no-op on other C libraries."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)


def uvicorn_config(app, args, **options):
    """uvicorn with GuardedProtocol; its own keep-alive timeout is never longer than ours.
    options: more uvicorn.Config settings."""
    protocol = functools.partial(GuardedProtocol, header_timeout=args.header_timeout,
                                 max_connections=args.max_connections)
    return uvicorn.Config(app, http=protocol, log_level="warning", timeout_graceful_shutdown=10,
                          server_header=False, timeout_keep_alive=min(5, args.header_timeout),
                          **options)


def main(args):
    if args.batch_wait_ms < 0:
        raise UserError(f"--batch_wait_ms must be 0 or more, got {args.batch_wait_ms}")
    for origin in args.allow_origin:
        if origin != "*" and not urlsplit(origin).netloc:
            raise UserError(f"--allow_origin {origin!r} is not an origin; write it as "
                            "scheme://host[:port], e.g. https://photos.example.org")
    limit_malloc_arenas()
    predictor = load_predictor(args)
    app = app_from_args(predictor, args)
    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    if not is_loopback(args.host):
        warn(f"listening on {args.host}:{port}: anyone on this network can use the classifier"
             f"{'' if args.token else ' (--token requires a password)'}")
    fragment = f"#token={args.token}" if args.token else ""
    shown_host = lan_address() if args.host in ("0.0.0.0", "::") else args.host
    print(f"serving {len(predictor.classes)} classes at http://{shown_host}:{port}/{fragment} "
          "(Ctrl-C to stop)", flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, args)).run(sockets=[sock])
    finally:
        print("stopped", flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
