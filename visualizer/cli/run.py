"""``visualizer run``: run an unmodified script with capture on, then save what it captured.

Saving needs arrays: a key whose values are not all arrays or numbers (a
dict, ``None``, a string, a list of tensors of different shapes) cannot be
stored without pickle, so ``run`` leaves that key out of the file and names
it in a warning; every other key is saved with ``visualizer.storage.save``.
Keys of functions that never ran are left out too (a ``--watch`` target that
captured nothing is warned about).
"""
import argparse
import os
import re
import runpy
import sys
import time
import traceback
import warnings
from typing import Any, Dict, List, Optional, Tuple

from .. import get_local, storage
from .._errors import VisualizerError
from ..attention import to_numpy
from ._common import (FORMATTER, INTERRUPTED, OK, PROG, SCRIPT_FAILED, Say, add_quiet, error,
                      require, shapes)

_DESCRIPTION = """\
Run an unmodified Python script as 'python SCRIPT ARGS...' would, with capture
on, then save every capture to one .npz file (no pickle; read it back with
get_local.load or 'visualizer plot').  The attention presets
(get_local.watch_attention: timm ViT family, transformers BERT family,
torch.nn.MultiheadAttention) are on unless --no-presets; --watch adds any
function of your own.  Every --watch target is checked before the script
starts.  Keys whose values are not arrays or numbers are left out of the file
with a warning.  If the script fails, its traceback is shown, the captures
made so far are still saved, and the exit status is the script's."""

_EPILOG = """\
examples:
  visualizer run train.py --epochs 1
  visualizer run --watch mymodel.attention=attn,scores --out attn.npz eval.py
  visualizer run --no-presets --watch timm.layers.attention.Attention.forward=q,k eval.py

Everything after SCRIPT is passed to the script, options included."""


def add_parser(commands: Any) -> None:
    """Add ``run`` to the subparsers ``commands``."""
    parser = commands.add_parser(
        "run", help="run a Python script with capture on and save the captures",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=FORMATTER,
        usage="%(prog)s [--watch DOTTED=VAR[,VAR]]... [--no-presets] [--out FILE] [-q] "
              "SCRIPT [ARGS...]")
    parser.add_argument("--watch", "-w", metavar="DOTTED=VAR[,VAR]", action="append",
                        default=[],
                        help="also capture the local variables VAR of the function at the "
                             "dotted path DOTTED (e.g. mymodel.Attention.forward=attn); "
                             "repeatable. Modules next to SCRIPT can be named.")
    parser.add_argument("--no-presets", action="store_true",
                        help="do not capture the attention of the supported model families; "
                             "only the --watch targets")
    parser.add_argument("--out", "-o", metavar="FILE",
                        help="the .npz file to write (default: <script name>_captures.npz "
                             "in the current folder)")
    add_quiet(parser, argparse.SUPPRESS)
    parser.add_argument("script", metavar="SCRIPT", help="the Python script to run")
    parser.add_argument("args", metavar="ARGS", nargs=argparse.REMAINDER,
                        help="arguments for the script")
    parser.set_defaults(func=run)


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _parse_watch(spec: str) -> Tuple[str, Tuple[str, ...]]:
    """Split ``'pkg.mod.f=a,b'`` into ``('pkg.mod.f', ('a', 'b'))``; clear error if malformed."""
    example = "e.g. --watch mymodel.Attention.forward=attn or =attn,scores"
    dotted, sep, names = spec.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise error("--watch {!r}: expected DOTTED=VAR[,VAR] (the function's dotted path, "
                    "'=', then the variable names), {}".format(spec, example))
    parts = dotted.split(".")
    if len(parts) < 2 or not all(_IDENTIFIER.match(p) for p in parts):
        raise error("--watch {!r}: {!r} is not a dotted path module.function, {}".format(
            spec, dotted, example))
    variables = tuple(n.strip() for n in names.split(","))
    bad = [n for n in variables if not _IDENTIFIER.match(n)]
    if bad:
        raise error("--watch {!r}: {} {} not a variable name, {}".format(
            spec, ", ".join(repr(b) for b in bad), "is" if len(bad) == 1 else "are", example))
    return dotted, tuple(dict.fromkeys(variables))


def run(args: argparse.Namespace, say: Say) -> int:
    """Run ``args.script`` with capture on, save its captures; return the script's status."""
    specs = [_parse_watch(spec) for spec in args.watch]
    script = os.path.abspath(args.script)
    if not os.path.exists(script):
        raise error("no such script: {}".format(args.script))
    if os.path.isdir(script):
        raise error("{} is a folder; run a Python script inside it".format(args.script))
    try:  # python itself exits 2 for a script it cannot open; so do we, before running it
        with open(script, "rb"):
            pass
    except OSError as exc:
        raise error("cannot read the script {}: {}".format(
            args.script, exc.strerror or exc)) from None
    stem = os.path.splitext(os.path.basename(script))[0]
    out = args.out or "{}_captures.npz".format(stem)
    if args.no_presets and not specs:
        raise error("nothing to capture: with --no-presets, name what to capture with "
                    "--watch DOTTED=VAR[,VAR]")
    require("numpy", "run (to save the captures)")
    _check_output(out)

    saved_argv, saved_path = sys.argv[:], sys.path[:]
    # As 'python script.py' does: the script's folder first on the path, so
    # its own modules import (and can be named by --watch) the same way.
    sys.path[0:1] = [os.path.dirname(script)]
    sys.argv = [args.script] + list(args.args)
    try:
        watched = [_watch(dotted, names, stem, args.script) for dotted, names in specs]
        if not args.no_presets:
            get_local.watch_attention()
        what = [w[0] + "=" + ",".join(w[1]) for w in specs]
        if not args.no_presets:
            what.insert(0, "the attention presets")
        say("running {} with capture on ({}) ...".format(args.script, "; ".join(what)))
        started = time.time()
        with get_local.capture() as cache, _terminated_as_exit():
            status, failure = _run_script(script)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path

    if failure is not None:
        _print_script_traceback(failure, script)
    elapsed = time.time() - started
    count = _save_captures(cache, out, watched, say)
    if failure is not None or status != OK:
        reason = ("raised {}".format(type(failure).__name__) if failure is not None
                  else "exited with status {}".format(status))
        print("{}: the script {}; the {} captures made before that were saved to {}".format(
            PROG, reason, count, out), file=sys.stderr)
    else:
        say("the script finished in {:.1f} s".format(elapsed))
    return status


def _check_output(out: str) -> None:
    """Fail before the script runs if its captures could not be written to ``out``."""
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise error("--out {} is a folder; name the .npz file to write".format(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise error("--out {}: cannot create its folder: {}".format(
            out, exc.strerror or exc)) from None
    if not os.access(parent, os.W_OK):
        raise error("--out {}: the folder {} is not writable".format(out, parent))


def _watch(dotted: str, names: Tuple[str, ...], stem: str, script: str) -> Tuple[str, Any]:
    """Watch one --watch target; return ``(dotted, function)``."""
    top = dotted.split(".")[0]
    if top in ("__main__", stem):
        raise error(
            "--watch {}: functions defined in the script itself ({}) do not exist before it "
            "runs and cannot be watched from the command line; move them into a module next "
            "to the script and watch that, or decorate them with @get_local({})".format(
                dotted, script, ", ".join(repr(n) for n in names)))
    try:
        function = get_local.watch(dotted, *names)
    except VisualizerError:
        raise
    except Exception as exc:  # the module exists but importing it failed
        raise error("--watch {}: importing its module failed: {}: {}".format(
            dotted, type(exc).__name__, exc)) from None
    return dotted, function


class _terminated_as_exit:
    """While the script runs, SIGTERM ends it as ``sys.exit(143)``, so its captures are saved.

    torchrun (and other launchers) stop the other processes with SIGTERM when
    one rank fails; each then still saves what it captured.
    """

    def __enter__(self) -> "_terminated_as_exit":
        import signal
        import threading

        self.previous = None
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._exit)
        return self

    @staticmethod
    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            import signal

            signal.signal(signal.SIGTERM, self.previous)


def _run_script(script: str) -> Tuple[int, Optional[BaseException]]:
    """Run ``script`` as ``__main__``; return ``(exit status, exception or None)``."""
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return OK, None
        if isinstance(code, int):
            return code, None
        print(code, file=sys.stderr)  # as Python does for sys.exit("message")
        return SCRIPT_FAILED, None
    except KeyboardInterrupt as exc:
        return INTERRUPTED, exc
    except BaseException as exc:
        return SCRIPT_FAILED, exc
    return OK, None


def _print_script_traceback(exc: BaseException, script: str) -> None:
    """Print ``exc`` as Python would for the script: from its first frame on, without ours."""
    tb = exc.__traceback__
    first = tb
    while first is not None and os.path.abspath(first.tb_frame.f_code.co_filename) != script:
        first = first.tb_next
    # No frame of the script (a SyntaxError): print the error alone, as Python does.
    traceback.print_exception(type(exc), exc, first, file=sys.stderr)


def _refused(np: Any, values: list) -> Optional[str]:
    """Say which value of ``values`` ``storage.save`` would refuse, or None if it takes them all.

    The rule is storage's: an array of numbers after the conversion it makes
    (tensors to NumPy), never objects or strings, which would need pickle.
    """
    for i, value in enumerate(values):
        try:
            value = to_numpy(value)
            with warnings.catch_warnings():  # NumPy < 1.24 warns about ragged lists
                warnings.simplefilter("ignore")
                array = np.asarray(value)
        except Exception:
            array = None
        if array is None or array.dtype.hasobject or array.dtype.kind in "USV":
            return "call {} gave {}".format(i + 1, _describe_value(value))
    return None


def _describe_value(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return "a {} of {} items".format(type(value).__name__, len(value))
    return "a {}".format(type(value).__name__)


def _save_captures(cache: Dict[str, list], out: str, watched: List[Tuple[str, Any]],
                   say: Say) -> int:
    """Save the keys of ``cache`` that have values and that storage takes; return the count."""
    import numpy as np

    for dotted, function in watched:
        qualname = function.__qualname__
        keys = [k for k in cache if k == qualname or k.startswith(qualname + ".")]
        if not any(cache[k] for k in keys):
            say.warn("--watch {}: nothing captured; {} never returned while the script ran "
                     "(is it the function the script calls?)".format(dotted, qualname))
    kept = {}
    for key, values in cache.items():
        if not values:
            continue
        problem = _refused(np, values)
        if problem is not None:
            say.warn("not saved: {!r} ({}), which cannot be stored without pickle; capture an "
                     "array or a number, or a transform of it "
                     "(get_local.configure(transform=...))".format(key, problem))
            continue
        kept[key] = list(values)
    try:
        out = storage.save(kept, out)  # under torch.distributed: this rank's file
    except OSError as exc:
        raise error("cannot write the captures to {}: {}".format(out, exc)) from None
    count = sum(len(v) for v in kept.values())
    if not kept:
        say.warn("nothing was captured, so {} holds no values. None of the watched functions "
                 "returned while the script ran: check that it runs the model (the presets "
                 "cover timm ViTs, transformers BERT-like models and "
                 "torch.nn.MultiheadAttention), or name the function with --watch".format(out))
        return 0
    say("saved {} value{} of {} key{} to {}:".format(
        count, "" if count == 1 else "s", len(kept), "" if len(kept) == 1 else "s", out))
    width = max(len(k) for k in kept)
    for key, values in kept.items():
        say("  {}  {} {}  {}".format(key.ljust(width), len(values),
                                    "call " if len(values) == 1 else "calls",
                                    shapes(np, values)))
    return count
