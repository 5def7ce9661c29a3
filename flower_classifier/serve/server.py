"""Running an app of ours: the listening socket, uvicorn with the guarded protocol, and a
predictor warmed up before the first request.

    sock = listen("127.0.0.1", 8000)
    uvicorn.Server(uvicorn_config(app, config)).run(sockets=[sock])
"""
import contextlib
import ctypes
import functools
import ipaddress
import socket

import uvicorn
from PIL import Image

from flower_classifier.serve.batcher import SERVER_JOB_SIZE
from flower_classifier.serve.guards import GuardedProtocol, lan_address
from flower_classifier.utils.console import warn
from flower_classifier.utils.errors import UserError, error_reason

M_ARENA_MAX = -8  # glibc's mallopt parameter


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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


def warm_up(predictor, max_batch):
    """Run the predictor's backbone engine twice on every batch size up to max_batch: the
    first runs of a new size compile and allocate (measured with the traced torch backbone:
    250 MB up to 16), which no request should pay for, nor show as growing memory."""
    blank = predictor.transform(Image.new("RGB", (predictor.preprocess.crop,) * 2))
    for size in [*range(1, max_batch + 1)] * 2:
        predictor.outputs(blank.expand(size, -1, -1, -1), job_size=SERVER_JOB_SIZE)
    return predictor


def limit_malloc_arenas():
    """Two glibc malloc arenas instead of one per thread: uploads decoded in one thread and freed
    in another otherwise fragment the arenas, and memory grew by 100-200 MB over a few thousand
    requests (measured with benchmarks/serve_load.py); a no-op on other C libraries."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 2)


def uvicorn_config(app, config, **options):
    """uvicorn with GuardedProtocol; its own keep-alive timeout is never longer than ours.
    config: a ServeConfig (its header_timeout and max_connections); options: more
    uvicorn.Config settings."""
    protocol = functools.partial(GuardedProtocol, header_timeout=config.header_timeout,
                                 max_connections=config.max_connections)
    return uvicorn.Config(app, http=protocol, log_level="warning", timeout_graceful_shutdown=10,
                          server_header=False, timeout_keep_alive=min(5, config.header_timeout),
                          **options)


def serve_until_stopped(app, config, sock, what, exposed):
    """Say where the app is (this machine's network address when bound to every interface,
    the token in the fragment), warn when the network can reach it, then serve until Ctrl-C.
    what: the first words of the line ("serving 102 classes"); exposed: the warning's end."""
    port = sock.getsockname()[1]
    if not is_loopback(config.host):
        warn(f"listening on {config.host}:{port}: {exposed}")
    fragment = f"#token={config.token}" if config.token else ""
    shown_host = lan_address() if config.host in ("0.0.0.0", "::") else config.host
    print(f"{what} at http://{shown_host}:{port}/{fragment} (Ctrl-C to stop)", flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, config)).run(sockets=[sock])
    finally:
        print("stopped", flush=True)
