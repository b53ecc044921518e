"""The ``diffkit`` command (also ``python -m diffkit``): one module per command.

Errors in what the user asked for print one line (``error: ...``) on stderr and exit with status 2; an
interrupt (Ctrl-C) prints one line and exits with 130. Outputs are checked before any work starts, written
atomically, and never replace what diffkit did not write.
"""

import os
import sys

from .. import __version__
from . import anagram, common, complete, env, eval, generate, harness, quantize, restore, train, upscale
from .common import Parser, UsageError


COMMANDS = (generate, eval, train, restore, complete, anagram, upscale, quantize, harness, env)  # each: add_parser(sub) setting args.run


def build_parser() -> Parser:
    parser = Parser(prog="diffkit", description="Diffusion methods on one solver core, as diffusers pipelines.")
    parser.add_argument("--version", action="version", version=f"diffkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _close_progress_bars() -> None:
    """A bar left open by a failing run would print the error on its own line and redraw itself after it."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except BrokenPipeError:  # the reader (`| head`) stopped: no more output, no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        _close_progress_bars()
        print("error: interrupted (only complete files were written)", file=sys.stderr)
        return 130
    except MemoryError:
        _close_progress_bars()
        print("error: out of memory; use fewer or smaller images per batch (--batch-size, -n)", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError, SafetensorError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        _close_progress_bars()
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


__all__ = ["UsageError", "build_parser", "common", "main"]
