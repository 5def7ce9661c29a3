"""Serve the classifier to phones and programs: a web page and an HTTP API on one port.

    python serve.py checkpoints/checkpoint.pth --category_names cat_to_name.json
    python serve.py checkpoints/checkpoint.pth --host 0.0.0.0 --token SECRET   # phones on the Wi-Fi
    curl -F file=@photo.jpg 'http://127.0.0.1:8000/predict?top_k=3'

`GET /` is the page (take or pick a photo, see the top names with bars); `POST /predict` takes a
multipart field `file` or the raw image bytes and answers predict.py --json's object; `GET
/health` and `GET /classes` describe the model. Concurrent requests share one model batch: images
are decoded in threads, never on the event loop, and a worker thread runs the model on whatever
requests are waiting, pausing up to --batch_wait_ms for requests still being decoded.
"""
import argparse
import asyncio
import contextlib
import ctypes
import hmac
import io
import ipaddress
import math
import os
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

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
from data_utils import UNREADABLE_IMAGE_ERRORS, load_image
from engines import ENGINE_CHOICES
from predictor import Predictor

STATIC = Path(__file__).resolve().parent / "static"
# A server's job never ends: --engine auto chooses for it as for a large folder (OpenVINO on the
# CPU), however small each batch is.
SERVER_JOB_SIZE = math.inf
UPLOAD_FIELD = "file"
M_ARENA_MAX = -8  # glibc's mallopt parameter


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
    parser.add_argument("--max_upload_mb", type=positive_float, default=20,
                        help="largest upload accepted, in MB; larger ones get 413 unread")
    parser.add_argument("--max_batch", type=positive_int, default=16,
                        help="most images the model runs at once (start-up runs every size up "
                        "to it)")
    parser.add_argument("--batch_wait_ms", type=float, default=10,
                        help="longest wait for requests still being decoded to join a batch")
    return parser


class BadRequest(Exception):
    """A request the client can fix: answered with its status and {"error": message}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


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

    async def predict(self, tensor, top_k, path):
        """The Prediction of one preprocessed image, computed in a batch with its neighbours."""
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), deadline - loop.time())
        batch, self.waiting = self.waiting[:self.max_batch], self.waiting[self.max_batch:]
        return batch

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [item for item in batch if not item[3].done()]  # skip cancelled requests
            if not batch:
                continue
            try:
                predictions = await loop.run_in_executor(self.model_thread, self._predict, batch)
            except Exception as error:  # a model failure fails this batch, not the server
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
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


def prepare_upload(data, predictor):
    """The uploaded bytes decoded and preprocessed for the model, or a BadRequest saying what is
    wrong with them."""
    if not data:
        raise BadRequest(400, "The upload is empty; send a photo such as a JPEG or PNG file.")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
        if width * height > Image.MAX_IMAGE_PIXELS:
            raise BadRequest(413, f"The image is {width}x{height} pixels, more than the "
                             f"{Image.MAX_IMAGE_PIXELS} that are decoded safely; send a smaller photo.")
        image = load_image(io.BytesIO(data), predictor.preprocess.resize)
    except UNREADABLE_IMAGE_ERRORS as error:
        reason = ("not a known image format" if isinstance(error, UnidentifiedImageError)
                  else error_reason(error))
        raise BadRequest(400, f"The upload is not an image that can be read ({reason}); send a "
                         "photo such as a JPEG or PNG file.") from None
    return predictor.transform(image)


async def read_body(request, limit):
    """The request body, refused with 413 as soon as it is known to exceed limit bytes."""
    too_large = BadRequest(413, f"The upload is larger than the {limit / 1e6:g} MB limit; send a "
                           "smaller photo (the server's --max_upload_mb sets the limit).")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to read the answer; it only must not log a crash
        raise BadRequest(400, "The upload was cut off before its end; send it again.") from None
    return b"".join(chunks)


async def uploaded_file(request, limit):
    """(bytes, file name) of the photo: multipart field `file`, or the raw body."""
    body = await read_body(request, limit)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):
        raise BadRequest(400, f"Send the photo as multipart/form-data field '{UPLOAD_FIELD}' or as "
                         "the raw request body, not URL-encoded.")
    if not content_type.startswith("multipart/form-data"):
        return body, "upload"

    async def replay():
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=4, max_fields=16).parse()
    except MultiPartException as error:
        raise BadRequest(400, f"The multipart form cannot be read ({error.message}); send the "
                         f"photo as the form field '{UPLOAD_FIELD}'.") from None
    upload = form.get(UPLOAD_FIELD)
    if upload is None:
        fields = ", ".join(form.keys()) or "none"
        raise BadRequest(400, f"The form has no field '{UPLOAD_FIELD}' (fields: {fields}); send "
                         f"the photo as the form field '{UPLOAD_FIELD}'.")
    if isinstance(upload, str):
        raise BadRequest(400, f"The form field '{UPLOAD_FIELD}' holds text, not a file; send the "
                         f"photo as a file upload, as `curl -F {UPLOAD_FIELD}=@photo.jpg` does.")
    data = await upload.read()
    await form.close()
    return data, upload.filename or "upload"


def requested_top_k(request, default):
    text = request.query_params.get("top_k")
    if text is None:
        return default
    if not text.isdigit() or int(text) < 1:
        raise BadRequest(400, f"top_k must be a whole number of at least 1, got {text!r}.")
    return int(text)


def error_response(status, message, headers=None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(predictor, top_k=5, token=None, max_upload_mb=20.0, max_batch=16, batch_wait_ms=10.0,
               decode_threads=None):
    """The Starlette app: the page, /predict, /health and /classes around one Batcher.
    decode_threads (default: the cores) decode and preprocess uploads."""
    limit = int(max_upload_mb * 1e6)
    batcher = Batcher(predictor, max_batch, batch_wait_ms / 1000)
    # One torch thread each: their small tensor ops must not compete with the model's threads.
    decoders = ThreadPoolExecutor(decode_threads or os.cpu_count() or 1,
                                  thread_name_prefix="decode", initializer=torch.set_num_threads,
                                  initargs=(1,))

    def check_token(request):
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
            raise BadRequest(401, "A valid token is required; send the header "
                             "'Authorization: Bearer TOKEN' with the server's --token.")

    async def predict(request):
        check_token(request)
        k = min(requested_top_k(request, top_k), len(predictor.classes))
        data, name = await uploaded_file(request, limit)
        batcher.decoding += 1
        try:
            tensor = await asyncio.get_running_loop().run_in_executor(
                decoders, prepare_upload, data, predictor)
        finally:
            batcher.decoding -= 1
        prediction = await batcher.predict(tensor, k, name)
        return JSONResponse(prediction.as_json())

    async def health(request):
        working = not batcher.worker.done()
        return JSONResponse({"status": "ok" if working else "the model worker stopped",
                             "classes": len(predictor.classes), "batches": batcher.batches,
                             "images": batcher.images}, status_code=200 if working else 503)

    async def classes(request):
        check_token(request)
        return JSONResponse({"classes": list(predictor.classes), "names": list(predictor.names)})

    async def page(request):
        return FileResponse(STATIC / "index.html")

    async def bad_request(request, error):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return error_response(error.status, str(error), headers)

    async def http_error(request, error):
        return error_response(error.status_code, f"{error.detail}.", error.headers)

    async def server_error(request, error):  # a bug: uvicorn logs the traceback after this answer
        return error_response(500, f"The server failed on this request ({error_reason(error)}); "
                              "try again, and report it if it keeps failing.")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown()

    routes = [Route("/", page), Route("/predict", predict, methods=["POST"]),
              Route("/health", health), Route("/classes", classes),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        BadRequest: bad_request, HTTPException: http_error, Exception: server_error})


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


def main(args):
    if args.batch_wait_ms < 0:
        raise UserError(f"--batch_wait_ms must be 0 or more, got {args.batch_wait_ms}")
    limit_malloc_arenas()
    # prepare_upload refuses images over Pillow's pixel limit itself, with a 413 answer.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    predictor = load_predictor(args)
    app = create_app(predictor, args.top_k, args.token, args.max_upload_mb, args.max_batch,
                     args.batch_wait_ms)
    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    if not is_loopback(args.host):
        warn(f"listening on {args.host}:{port}: anyone on this network can use the classifier"
             f"{'' if args.token else ' (--token requires a password)'}")
    fragment = f"#token={args.token}" if args.token else ""
    shown_host = lan_address() if args.host in ("0.0.0.0", "::") else args.host
    print(f"serving {len(predictor.classes)} classes at http://{shown_host}:{port}/{fragment} "
          "(Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10,
                            server_header=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        print("stopped", flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
