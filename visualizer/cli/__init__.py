"""The ``visualizer`` command: a demo, capture from an unmodified script, figures from a file.

::

    visualizer demo --out figures/                 # ViT and BERT attention as PNGs, offline
    visualizer run train.py --epochs 1             # capture attention (presets) while it runs
    visualizer run --watch mymodel.attention=attn,scores train.py
    visualizer plot train_captures.npz --out figures/
    visualizer view train_captures.npz --out attention.html   # an interactive page

``python -m visualizer`` is the same command.  This module is the parser
and the dispatch; each command is a module of its own (``demo``, ``run``,
``plot``, ``view``) and what they share is in ``_common``.  Everything the
command itself says (progress, summaries, warnings, errors) goes to stderr,
so a script run with ``run`` keeps stdout to itself; ``-q`` silences
progress but not warnings.

Exit statuses, the same situation giving the same one in every command:
0 done; 1 the script under ``run`` raised (its traceback is shown; a
``sys.exit`` status passes through as it is); 2 bad usage or input, in one
line ``visualizer: error: ...`` (an unknown watch target, a missing script
or file, a file that is not a cache, a cache with nothing to draw, a missing
optional library); 130 interrupted.
"""
import argparse
import sys
from typing import Optional, Sequence

from .. import __version__
from .._errors import VisualizerError
from . import demo, plot, run, view
from ._common import BAD_INPUT, FORMATTER, INTERRUPTED, PROG, Say, add_quiet, one_line

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
Capture attention maps (or any local variable) from inside a model's forward
pass, save them without pickle, and draw them."""

_EPILOG = """\
examples:
  visualizer demo --out figures/
  visualizer run my_script.py --its-own-args
  visualizer run --watch mymodel.Attention.forward=attn --out attn.npz my_script.py
  visualizer plot attn.npz --out figures/
  visualizer view attn.npz --out attention.html

'visualizer COMMAND --help' describes each command."""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``visualizer`` command.

    Each subcommand's ``func`` is its module's ``run(args, say)``.

    >>> build_parser().parse_args(['plot', 'attn.npz', '--out', 'figures']).out
    'figures'
    """
    parser = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=FORMATTER)
    parser.add_argument("--version", action="version",
                        version="%(prog)s {}".format(__version__))
    add_quiet(parser, False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (demo, run, plot, view):
        command.add_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``visualizer`` command with ``argv`` (default: ``sys.argv[1:]``); return its status.

    The statuses are in this module's docstring.  Without a command, prints
    the help and returns 2.

    >>> main(['plot', 'missing.npz', '--out', 'figures'])   # doctest: +SKIP
    visualizer: error: no such file: missing.npz
    2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else BAD_INPUT
    if args.command is None:
        parser.print_help(sys.stderr)
        return BAD_INPUT
    say = Say(args.quiet)
    try:
        return args.func(args, say)
    # OSError: an output folder we cannot write to, a full disk, a file we may not read
    except (VisualizerError, OSError) as exc:
        print("{}: error: {}".format(PROG, one_line(str(exc))), file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("{}: interrupted".format(PROG), file=sys.stderr)
        return INTERRUPTED
