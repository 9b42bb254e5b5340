"""The ``msdiff`` command: demo, train, sample, evaluate, bench.

Every subcommand is configured by flags and, optionally, a JSON or TOML file (``--config``)
whose keys are the flags' long names (``batch-size`` or ``batch_size``); flags given on the
command line win over the file. A file may hold one table per subcommand ([train], [sample], ...);
otherwise its top-level keys are used. User errors (a missing checkpoint, an unreadable image,
a bad flag value, ...) print one line ``msdiff: error: ...`` and exit non-zero; set
MSDIFF_TRACEBACK=1 to see the Python traceback instead.

One module per subcommand, each with ``add_parser(commands)`` and ``run(args)``: a thin layer over
the library (``msdiff_fast.restoration``, ``training``, ``metrics``, ``demo``), which never imports it.
"""

import argparse
import os
import sys
from typing import Optional, Sequence

from .. import __version__
from ..errors import UsageError, one_line
from . import bench, demo, evaluate, sample, train
from .common import PROG, HelpFormatter, Parser
from .config import config_arguments, load_config

__all__ = ["CLIError", "PROG", "build_parser", "main", "parse_arguments"]

CLIError = UsageError  # the name this module has always exported

# in the order `msdiff --help` lists them
COMMANDS = {"demo": demo, "train": train, "sample": sample, "evaluate": evaluate, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        formatter_class=HelpFormatter,
        description="Conditional score-based diffusion for image inverse problems, sampled in 5-20 network evaluations.",
        epilog=(
            "start here:\n  msdiff demo --out demo_out        trains, samples and evaluates small models on a CPU (~15 min)\n\n"
            "a full round trip:\n  msdiff train --task sr --estimator cmde --steps 20000 --out runs/sr\n"
            "  msdiff sample --checkpoint runs/sr --input low_res/ --out restored/ --sampler mr-sde --nfe 10\n"
            "  msdiff evaluate --restored restored/ --reference high_res/ --task sr\n\n"
            "errors print one line; set MSDIFF_TRACEBACK=1 to see the traceback"
        ),
    )
    parser.add_argument("--version", action="version", version=f"msdiff_fast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in COMMANDS.values():
        module.add_parser(commands).set_defaults(handler=module.run)
    return parser


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise UsageError("choose a command: demo, train, sample, evaluate or bench (start with `msdiff demo --out demo_out`)", 2)
    if getattr(args, "config", None):
        subparser = parser._subparsers._group_actions[0].choices[args.command]
        tokens = config_arguments(load_config(args.config, args.command, tuple(COMMANDS)), subparser, args.config)
        position = list(argv).index(args.command)
        args = parser.parse_args([*argv[: position + 1], *tokens, *argv[position + 1 :]])
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``msdiff`` with ``argv`` (default: sys.argv[1:]); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = os.environ.get("MSDIFF_TRACEBACK", "") not in ("", "0")
    try:
        args = parse_arguments(argv)
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UsageError as err:
        if show_traceback:
            raise
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return err.code
    except (ValueError, TypeError, OSError, FloatingPointError, RuntimeError) as err:
        # The library's input checks raise ValueError / TypeError with a message that names the
        # argument; files raise OSError; a diverging sampler raises FloatingPointError.
        if show_traceback:
            raise
        print(f"{PROG}: error: {one_line(err)} (set MSDIFF_TRACEBACK=1 for details)", file=sys.stderr)
        return 1
