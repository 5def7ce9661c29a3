"""One model pass for the images of concurrent requests.

    batcher = Batcher(predictor, max_batch=16, wait_s=0.01)
    batcher.start()                                     # in the event loop
    with batcher.decoding():                            # a request is decoding an image
        tensor = ...
    prediction = await batcher.predict(tensor, top_k=5, path="photo.jpg")
"""
import asyncio
import contextlib
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from flower_classifier.serve.answers import busy

# A server's job never ends: --engine auto chooses for it as for a large folder (OpenVINO on the
# CPU), however small each batch is.
SERVER_JOB_SIZE = math.inf


class Batcher:
    """Runs the model on the images of concurrent requests together, in one worker thread.

    A batch starts with the oldest waiting image and takes every image already queued; while other
    requests are still decoding it waits up to `wait_s` for them, so one lone request never waits.
    """

    def __init__(self, predictor, max_batch, wait_s):
        self.predictor, self.max_batch, self.wait_s = predictor, max_batch, wait_s
        self.waiting = []  # (tensor, top_k, path, future) of preprocessed images, oldest first
        self.arrived = asyncio.Event()
        self.decoders = 0  # requests decoding an image now: they will be waiting soon
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

    @contextlib.contextmanager
    def decoding(self):
        """Around a request's decoding: a batch being formed waits for it (up to wait_s)."""
        self.decoders += 1
        try:
            yield
        finally:
            self.decoders -= 1

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
        while len(self.waiting) < self.max_batch and self.decoders and loop.time() < deadline:
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
