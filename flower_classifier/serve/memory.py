"""The memory a server holds for requests (upload bodies, decoded pixels), shared by the event
loop and the decoding threads: a request that would pass the total gets 503 instead of growing
the process.

    budget = MemoryBudget(512e6)
    with budget.account() as share:
        share.take(len(body) * 2)
"""
import contextlib
import threading

from flower_classifier.serve.answers import BadRequest, busy

# Memory only requests that hold less than this may use: a flood of large uploads cannot take
# the room that phone photos and API calls need.
SMALL_REQUEST_BYTES = 8_000_000
SMALL_REQUEST_RESERVE = 32_000_000


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
