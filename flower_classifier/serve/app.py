"""The served app: the page, /predict, /health and /classes around one Batcher.

    app = create_app(Predictor("checkpoint.pth"), ServeConfig(token="SECRET"))

Concurrent requests share one model batch: images are decoded in threads, never on the event
loop, and a worker thread runs the model on whatever requests are waiting.
"""
import asyncio
import contextlib
import hmac
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from flower_classifier.serve.answers import BadRequest, busy, error_response
from flower_classifier.serve.batcher import Batcher
from flower_classifier.serve.guards import Gatekeeper
from flower_classifier.serve.memory import MemoryBudget
from flower_classifier.serve.uploads import (
    UPLOAD_FIELD,
    decode_upload,
    read_body,
    requested_top_k,
)

STATIC = Path(__file__).resolve().parent / "static"


def check_token(request, token):
    """401 unless the request carries `Authorization: Bearer token` (no token: anyone)."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Starlette decodes headers as latin-1: encoding back gives the bytes sent, any bytes.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("latin-1"), token.encode()):
        raise BadRequest(401, "A valid token is required; send the header "
                         "'Authorization: Bearer TOKEN' with the server's --token.",
                         {"WWW-Authenticate": "Bearer"})


class PredictionService:
    """The routes' state: the predictor behind its batcher, the memory budget, the decoding
    threads and the requests in flight."""

    def __init__(self, predictor, config):
        self.predictor, self.config = predictor, config
        self.batcher = Batcher(predictor, config.max_batch, config.batch_wait_ms / 1000)
        self.budget = MemoryBudget(config.memory_mb * 1e6)
        self.in_flight = 0
        # One torch thread each: their small tensor ops must not compete with the model's.
        self.decoders = ThreadPoolExecutor(config.decode_threads or os.cpu_count() or 1,
                                           thread_name_prefix="decode",
                                           initializer=torch.set_num_threads, initargs=(1,))

    async def answer(self, request, share, uploading):
        """The Prediction of the request's photo: read, decoded in a thread, then batched."""
        top_k = min(requested_top_k(request, self.config.top_k), len(self.predictor.classes))
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/x-www-form-urlencoded"):
            raise BadRequest(400, f"Send the photo as multipart/form-data field '{UPLOAD_FIELD}' "
                             "or as the raw request body, not URL-encoded.")
        body = await read_body(request, int(self.config.max_upload_mb * 1e6), share)
        uploading.clear()  # the upload is in: a timeout from here on is the server's
        with self.batcher.decoding():
            tensor, name = await asyncio.get_running_loop().run_in_executor(
                self.decoders, decode_upload, body, content_type, self.predictor, share)
        del body  # its memory is free before the model runs
        return await self.batcher.predict(tensor, top_k, name)

    async def predict(self, request):
        check_token(request, self.config.token)
        if self.in_flight >= self.config.max_in_flight:
            raise busy("The server is answering as many requests as it takes; try again in a "
                       "moment.")
        self.in_flight += 1
        uploading = asyncio.Event()
        uploading.set()
        timeout = self.config.request_timeout
        try:
            with self.budget.account() as share:
                prediction = await asyncio.wait_for(self.answer(request, share, uploading),
                                                    timeout)
        except asyncio.TimeoutError:
            if uploading.is_set():
                raise BadRequest(408, f"The upload took longer than {timeout:g} s; send it "
                                 "again on a faster connection.",
                                 {"Connection": "close"}) from None
            raise busy(f"The server could not answer within {timeout:g} s; try again in a "
                       "moment.") from None
        finally:
            self.in_flight -= 1
        return JSONResponse(prediction.as_json())

    async def health(self, request):
        problem = self.batcher.problem(stuck_after=self.config.request_timeout)
        return JSONResponse({"status": problem or "ok", "classes": len(self.predictor.classes),
                             "batches": self.batcher.batches, "images": self.batcher.images,
                             "in_flight": self.in_flight, "queued": len(self.batcher.waiting),
                             "token_required": self.config.token is not None},
                            status_code=503 if problem else 200)

    async def classes(self, request):
        check_token(request, self.config.token)
        return JSONResponse({"classes": list(self.predictor.classes),
                             "names": list(self.predictor.names)})

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.batcher.start()
        yield
        await self.batcher.stop()
        self.decoders.shutdown()


async def page(request):
    return FileResponse(STATIC / "index.html")


async def bad_request(request, error):
    return error_response(error.status, str(error), error.headers)


async def http_error(request, error):
    return error_response(error.status_code, f"{error.detail}.", error.headers)


# What every app of ours answers errors with: a sentence as JSON, never a traceback.
EXCEPTION_HANDLERS = {BadRequest: bad_request, HTTPException: http_error}


def gatekeeper(config):
    """The guards' middleware for an app bound as config says."""
    return Middleware(Gatekeeper, bound_host=config.host,
                      allowed_origins=list(config.allowed_origins))


def create_app(predictor, config):
    """The Starlette app serving predictor as config (serve.config.ServeConfig) says."""
    service = PredictionService(predictor, config)
    routes = [Route("/", page), Route("/predict", service.predict, methods=["POST"]),
              Route("/health", service.health), Route("/classes", service.classes),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    return Starlette(routes=routes, lifespan=service.lifespan, middleware=[gatekeeper(config)],
                     exception_handlers=EXCEPTION_HANDLERS)
