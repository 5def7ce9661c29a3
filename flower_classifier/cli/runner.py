"""How every command runs: main(args) with a user error as one `error:` line and exit code 2,
Ctrl-C and SIGTERM as a clean stop.

    if __name__ == "__main__":
        run_cli(main, get_args_parser())
"""
import os
import signal
import sys

from flower_classifier.utils.errors import UserError, error_reason
from flower_classifier.utils.processes import end_with_parent


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run stops cleanly, keeping what it saved."""
    exit_code = 143


def _raise_interrupted(signum, frame):
    raise Interrupted()


def run_cli(main, parser, argv=None):
    """Run main(args) and turn user errors and interrupts into one line and an exit code."""
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    end_with_parent()  # started by the studio: gone with it
    try:
        main(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        sys.exit(getattr(interrupt, "exit_code", 130))
    except BrokenPipeError:  # stdout closed early, as by `| head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except RuntimeError as error:  # torch.OutOfMemoryError is one; anything else is a bug
        if type(error).__name__ != "OutOfMemoryError":
            raise
        print(f"error: out of GPU memory ({error_reason(error)}); lower --batch_size, or "
              "run without --gpu", file=sys.stderr)
        sys.exit(2)
