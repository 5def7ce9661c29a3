"""serve.py's command line: its flags become a ServeConfig, and the app runs under uvicorn.

    python serve.py checkpoints/checkpoint.pth        # the usage: serve.py's docstring
"""
import argparse

from flower_classifier.cli.options import (
    HelpFormatter,
    add_category_names_argument,
    add_gpu_argument,
    add_threads_argument,
    category_names_from_flag,
    positive_float,
    positive_int,
    select_device,
    use_threads,
)
from flower_classifier.cli.runner import run_cli
from flower_classifier.inference.predictor import Predictor
from flower_classifier.models.engines import ENGINE_CHOICES
from flower_classifier.serve.app import create_app
from flower_classifier.serve.config import ServeConfig
from flower_classifier.serve.server import (
    limit_malloc_arenas,
    listen,
    serve_until_stopped,
    warm_up,
)

DEFAULTS = ServeConfig()


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Serve a checkpoint as a web page for phones and an HTTP API.",
        formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint.pth written by train.py")
    parser.add_argument("--host", default=DEFAULTS.host, help="address to listen on; 0.0.0.0 lets "
                        "phones and computers on the same network reach it")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    parser.add_argument("--top_k", type=positive_int, default=DEFAULTS.top_k,
                        help="classes per answer when a request does not say (?top_k=)")
    add_category_names_argument(parser)
    add_gpu_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                        help="what runs the backbone: auto takes OpenVINO on the CPU where it is "
                        "installed (the server is one long job), else torch")
    parser.add_argument("--token", default=None, help="require `Authorization: Bearer TOKEN` on "
                        "/predict and /classes (default: no token)")
    parser.add_argument("--allow_origin", action="append", default=[], metavar="ORIGIN",
                        help="also serve web pages from ORIGIN (e.g. https://photos.example.org) "
                        "and requests naming its host; repeatable; '*' turns the Host and Origin "
                        "checks off (default: only this machine's addresses and names)")
    parser.add_argument("--max_upload_mb", type=positive_float, default=DEFAULTS.max_upload_mb,
                        help="largest upload accepted, in MB; larger ones get 413 unread")
    parser.add_argument("--memory_mb", type=positive_float, default=DEFAULTS.memory_mb,
                        help="most memory held at once for uploads and decoded images, in MB; "
                        "requests beyond it get 503, images that alone exceed it 413")
    parser.add_argument("--max_connections", type=positive_int, default=DEFAULTS.max_connections,
                        help="most open connections; when full, the oldest idle one is closed, "
                        "else the new one gets 503")
    parser.add_argument("--max_in_flight", type=positive_int, default=DEFAULTS.max_in_flight,
                        help="most /predict requests handled at once; more get 503")
    parser.add_argument("--header_timeout", type=positive_float, default=DEFAULTS.header_timeout,
                        help="seconds a connection may take to send a request's headers, or "
                        "stay idle, before it is closed")
    parser.add_argument("--request_timeout", type=positive_float, default=DEFAULTS.request_timeout,
                        help="seconds a request may take from its headers to its answer (upload "
                        "included): later uploads get 408, later answers 503")
    parser.add_argument("--max_batch", type=positive_int, default=DEFAULTS.max_batch,
                        help="most images the model runs at once (start-up runs every size up "
                        "to it)")
    parser.add_argument("--batch_wait_ms", type=float, default=DEFAULTS.batch_wait_ms,
                        help="longest wait for requests still being decoded to join a batch")
    return parser


def config_from_args(args):
    """The ServeConfig of the parsed flags (a bad value is a UserError naming its flag)."""
    return ServeConfig(
        top_k=args.top_k, token=args.token, host=args.host,
        allowed_origins=tuple(args.allow_origin), max_upload_mb=args.max_upload_mb,
        memory_mb=args.memory_mb, max_connections=args.max_connections,
        max_in_flight=args.max_in_flight, header_timeout=args.header_timeout,
        request_timeout=args.request_timeout, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms)


def main(args):
    config = config_from_args(args)
    limit_malloc_arenas()
    use_threads(args.threads)
    predictor = Predictor(args.checkpoint, select_device(args.gpu),
                          category_names_from_flag(args.category_names), args.engine)
    app = create_app(warm_up(predictor, config.max_batch), config)
    sock = listen(args.host, args.port)
    exposed = ("anyone on this network can use the classifier"
               + ("" if args.token else " (--token requires a password)"))
    serve_until_stopped(app, config, sock, f"serving {len(predictor.classes)} classes", exposed)


def run(argv=None):
    """The console command (pyproject.toml), as `python serve.py`."""
    run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":  # python -m flower_classifier.cli.serve: the studio's camera try-out
    run()
