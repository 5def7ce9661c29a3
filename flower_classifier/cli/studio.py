"""studio.py's command line: open a photo folder in the studio, a local web app.

    python studio.py photos/            # the usage: studio.py's docstring
"""
import argparse
import gc
import shlex

from flower_classifier.cli import train
from flower_classifier.cli.options import (
    HelpFormatter,
    add_gpu_argument,
    non_negative_int,
    select_device,
)
from flower_classifier.cli.runner import run_cli
from flower_classifier.data.loading import default_workers
from flower_classifier.data.split import DEFAULT_FRACTIONS, parse_fractions
from flower_classifier.models.backbones import DEFAULT_ARCH, arch_choices
from flower_classifier.models.features import default_cache_dir
from flower_classifier.serve.config import ServeConfig
from flower_classifier.serve.server import (
    is_loopback,
    limit_malloc_arenas,
    listen,
    serve_until_stopped,
)
from flower_classifier.studio.app import create_app
from flower_classifier.studio.final import FinalTraining
from flower_classifier.studio.retrain import SCHEDULES, QuickTrainer
from flower_classifier.studio.state import StudioOptions, open_studio
from flower_classifier.studio.thumbnails import THUMBNAILS_FOLDER, ThumbnailWarmer
from flower_classifier.utils.errors import UserError


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Look through a photo folder in the browser: the data check's findings as "
        "galleries, one-click decisions\n(kept, dropped, relabelled) saved to corrections.json, "
        "and a quick retrain of the head.", formatter_class=HelpFormatter)
    parser.add_argument("data_dir", help="one folder per class, or train/ and valid/ (and "
                        "optionally test/) each with one folder per class")
    parser.add_argument("--save_dir", default="studio", help="where corrections.json, the "
                        "thumbnails, the split manifest and the data report go")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; any other "
                        "than this machine's loopback needs --token")
    parser.add_argument("--port", type=int, default=8100, help="port to listen on (0: any free "
                        "one)")
    parser.add_argument("--token", default=None, help="require `Authorization: Bearer TOKEN` on "
                        "the API (the page asks for it; required off loopback)")
    parser.add_argument("--allow_origin", action="append", default=[], metavar="ORIGIN",
                        help="also serve pages from ORIGIN and requests naming its host, as "
                        "serve.py")
    parser.add_argument("--unlabelled", default=None, metavar="FOLDER",
                        help="new photos to label with the model's help: the page suggests "
                        "the ones worth labelling, in batches by predicted class; a label adds "
                        "a photo to train/ through corrections.json (the photo is not moved)")
    parser.add_argument("--category_names", default=None, help="JSON file mapping class folder "
                        "names to names (default: data_dir/cat_to_name.json when present)")
    parser.add_argument("--split", default=",".join(map(str, DEFAULT_FRACTIONS.values())),
                        metavar="FRACTIONS", help="train,valid[,test] fractions of a one-folder "
                        "data_dir, as train.py")
    parser.add_argument("--split_from", default=None, metavar="MANIFEST",
                        help="use the split this manifest records instead of splitting anew")
    parser.add_argument("--arch", default=DEFAULT_ARCH, choices=arch_choices(), metavar="ARCH",
                        help="backbone whose features are checked and retrained on (as "
                        "train.py's, so its cache is shared)")
    parser.add_argument("--cache_dir", default=str(default_cache_dir()),
                        help="the feature cache train.py uses")
    parser.add_argument("--workers", type=non_negative_int, default=default_workers(),
                        help="processes decoding images")
    parser.add_argument("--retrain", choices=list(SCHEDULES), default="warm",
                        help="how a retrain trains: 'warm' continues the head the studio "
                        "trained on the folder as filed when it opened, for a few epochs on the "
                        "corrected photos; 'full' trains train.py --train_stages 0's head from "
                        "scratch each time (about three times longer)")
    parser.add_argument("--train_flags", default="", metavar="FLAGS",
                        help="train.py flags of the final model, in one quoted string (such as "
                        "\"--epochs 20 --augment 2\"; one flag alone as "
                        "--train_flags=--no_data_check); the studio gives the folder, the "
                        "decisions and the options above itself")
    add_gpu_argument(parser)
    return parser


# train.py flags the studio's final model gets from the studio (studio/final.py).
STUDIO_TRAIN_FLAGS = ("--save_dir", "--corrections", "--split_from", "--split", "--arch",
                      "--cache_dir", "--no_cache", "--workers", "--category_names", "--gpu",
                      "--resume")


def final_train_flags(text):
    """--train_flags as train.py's arguments, checked by train.py's parser now rather than
    when the final model starts."""
    try:
        flags = shlex.split(text)
    except ValueError as error:
        raise UserError(f"--train_flags {text!r}: {error}; quote it as one string") from None
    for name in (flag.split("=")[0] for flag in flags):
        if name in STUDIO_TRAIN_FLAGS:
            raise UserError(f"--train_flags cannot set {name}: the studio gives it to train.py "
                            "itself; leave it out")

    def refuse(reason):  # argparse's error(), which would print the usage and exit
        raise UserError(f"--train_flags {text!r}: {reason} (python train.py --help lists its "
                        "flags)")
    parser = train.get_args_parser()
    parser.error = refuse
    parser.parse_args(["data_dir", *flags])
    return tuple(flags)


def serve_config(args):
    """The guards' settings; off loopback a token is required."""
    if not is_loopback(args.host) and not args.token:
        raise UserError(f"--host {args.host} lets anyone on the network change your decisions; "
                        "add --token SECRET (the page asks for it), or leave --host out")
    return ServeConfig(token=args.token, host=args.host, allowed_origins=tuple(args.allow_origin))


def options_from_args(args):
    return StudioOptions(args.data_dir, save_dir=args.save_dir, arch=args.arch,
                         cache_dir=args.cache_dir, workers=args.workers,
                         split=parse_fractions(args.split), split_from=args.split_from,
                         category_names=args.category_names, unlabelled=args.unlabelled,
                         train_flags=final_train_flags(args.train_flags))


def main(args):
    config = serve_config(args)
    options = options_from_args(args)
    sock = listen(args.host, args.port)  # a busy port fails before the folder is read
    device = select_device(args.gpu)
    serve_studio(open_studio(options, device), config, sock, device, args.retrain)


def serve_studio(studio, config, sock, device, schedule):
    """Serve an opened Studio until stopped: its first run and the thumbnails (first pages
    first) begin in the background, and they (and a final model's training) end before the
    process does."""
    limit_malloc_arenas()  # as serve.py: arenas per thread keep what the runs freed
    gc.freeze()  # the photos, features and findings stay: collections need not walk them
    trainer, final = QuickTrainer(studio, device, schedule), FinalTraining(studio, device, config)
    trainer.start_first()
    warmer = ThumbnailWarmer(studio, studio.save_dir / THUMBNAILS_FOLDER)
    warmer.start()
    try:
        serve_until_stopped(create_app(studio, config, trainer, final), config, sock,
                            f"studio: {len(studio.photos)} photos of {len(studio.classes)} "
                            "classes", "anyone on this network with the token can change the "
                            "decisions")
    finally:
        final.stop()
        warmer.stop()
        trainer.stop()


def run(argv=None):
    """The console command (pyproject.toml), as `python studio.py`."""
    run_cli(main, get_args_parser(), argv)
