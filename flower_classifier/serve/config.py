"""Everything a server is set to, in one frozen configuration (as TrainConfig is for training):
what it answers, who may ask, and its limits.

    config = ServeConfig(top_k=3, token="SECRET", host="0.0.0.0")
    app = create_app(predictor, config)

serve.py's flags take their defaults from here.
"""
from dataclasses import dataclass
from urllib.parse import urlsplit

from flower_classifier.utils.errors import UserError


@dataclass(frozen=True)
class ServeConfig:
    """A server's settings; the limits guard it against hostile clients (docs/serve.md)."""
    top_k: int = 5                  # classes per answer when a request does not say
    token: str | None = None        # required as `Authorization: Bearer TOKEN` where set
    host: str = "127.0.0.1"         # the address it listens on (the Host check's names)
    allowed_origins: tuple = ()     # more web-page origins served; "*" turns the checks off
    max_upload_mb: float = 20     # larger uploads get 413 unread
    memory_mb: float = 512        # held at once for uploads and decoded images
    max_connections: int = 512      # when full, the oldest idle one is closed
    max_in_flight: int = 64         # /predict requests handled at once
    header_timeout: float = 10    # seconds to send a request's headers, or stay idle
    request_timeout: float = 30   # seconds from a request's headers to its answer
    max_batch: int = 16             # images the model runs at once
    batch_wait_ms: float = 10     # longest wait for requests still decoding to join a batch
    decode_threads: int | None = None  # threads parsing and decoding uploads (None: the cores)

    def __post_init__(self):
        if self.batch_wait_ms < 0:
            raise UserError(f"--batch_wait_ms must be 0 or more, got {self.batch_wait_ms}")
        for origin in self.allowed_origins:
            if origin != "*" and not urlsplit(origin).netloc:
                raise UserError(f"--allow_origin {origin!r} is not an origin; write it as "
                                "scheme://host[:port], e.g. https://photos.example.org")
