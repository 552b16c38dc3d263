"""``python -m benchmarks.coverage``: sweep transformers and timm under capture, write COVERAGE.md.

    python -m benchmarks.coverage                                   # both libraries, every architecture
    python -m benchmarks.coverage --library timm --only vit_small_patch16_224,cait_xxs24_224
    python -m benchmarks.coverage --jobs 2 --out COVERAGE.md --json results.json

Each architecture runs in its own forked child (memory cap ``--memory-gb``,
time limit ``--timeout``).  Progress goes to stderr, one line per
architecture; the table goes to ``--out`` (and the raw results to ``--json``).
Exits 0 when every architecture could be checked (a miss is a result, not a
failure of the sweep), 2 on bad arguments.
"""
import argparse
import json
import os
import signal
import sys
import time
import warnings

from . import _report, _sandbox

LIBRARIES = ("transformers", "timm")


def _log(message):
    print(message, file=sys.stderr, flush=True)


def _library(name):
    if name == "transformers":
        from . import _hf as module
    else:
        from . import _timm as module
    return module


def prepare(library):
    """Import the library (and watch it) once in the parent, so that every forked child shares it."""
    import torch

    torch.set_num_threads(1)
    from visualizer import get_local

    get_local.watch_attention()
    if library == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        import importlib

        # What every modeling module imports (modeling_utils, generation, masks,
        # torch.distributed.tensor...) takes seconds: import it once here, not
        # in each child.  A few common modeling modules pull all of it in.
        for name in ("transformers.models.auto.modeling_auto", "transformers.modeling_utils",
                     "transformers.generation.utils", "transformers.masking_utils",
                     "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert",
                     "transformers.models.t5.modeling_t5", "transformers.models.clip.modeling_clip",
                     "transformers.models.whisper.modeling_whisper", "transformers.models.vit.modeling_vit"):
            try:
                importlib.import_module(name)
            except Exception:  # a missing optional dependency: the child will say so
                pass
    else:
        import timm  # noqa: F401
    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def sweep(library, only=None, jobs=1, memory_gb=6.0, timeout=180.0, quiet=True, progress=True):
    """Check every architecture of ``library`` (or those in ``only``); return ``(results, seconds)``."""
    prepare(library)
    module = _library(library)
    names = module.model_types() if library == "transformers" else module.model_names()
    if only:
        known = set(names)
        if library == "timm":  # any timm model may be named, with attention or not
            import timm

            known.update(timm.list_models())
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ValueError("unknown {} architecture(s): {}".format(library, ", ".join(unknown)))
        names = list(only)
    started = time.monotonic()
    width = len(str(len(names)))

    def on_result(index, result):
        if progress:
            _log("[{}/{}] {} {}: {} {} ({:.1f} s)".format(
                str(index + 1).rjust(width), len(names), library, result["name"], result["status"],
                result.get("reason", "")[:160], result["seconds"]))

    results = _sandbox.run_all(module.check, names, jobs=jobs, memory_gb=memory_gb,
                               seconds=timeout, quiet=quiet, on_result=on_result)
    for result in results:
        result["library"] = library
    return results, time.monotonic() - started


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coverage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=LIBRARIES, action="append",
                        help="sweep only this library (repeatable; default: both)")
    parser.add_argument("--only", help="comma-separated architectures (model types or timm names)")
    parser.add_argument("--jobs", type=int, default=1, help="architectures checked at once (default 1)")
    parser.add_argument("--memory-gb", type=float, default=6.0,
                        help="address-space cap of each child in GiB (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds each architecture may take (default %(default)s)")
    parser.add_argument("--out", default=None, help="write the Markdown table here (default: stdout)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--verbose", action="store_true", help="let the children print")
    parser.add_argument("--from-json", metavar="FILE",
                        help="sweep nothing: write the table from the raw results of an earlier --json")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # unwind, so that every child is killed too
    if args.jobs < 1:
        parser.error("--jobs must be at least 1, got {}".format(args.jobs))
    if args.from_json:
        with open(args.from_json) as f:
            return _write(_report.markdown(json.load(f)), args.out)
    libraries = args.library or list(LIBRARIES)
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    if only is not None and not only:
        parser.error("--only names no architecture")
    if only and len(libraries) > 1:
        parser.error("--only needs one --library")
    sections = []
    for library in libraries:
        outcome = sweep_isolated(library, only, jobs=args.jobs, memory_gb=args.memory_gb,
                                 timeout=args.timeout, quiet=not args.verbose)
        if "results" not in outcome:
            reason = outcome.get("reason", "")
            if "unknown" in reason and "architecture" in reason:
                _log("python -m benchmarks.coverage: error: " + reason.split("ValueError: ", 1)[-1])
                return 2
            _log("{} sweep failed: {}".format(library, reason))
            return 1
        sections.append(outcome)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(sections, f, indent=1)
    return _write(_report.markdown(sections), args.out)


def _write(text, out):
    from .implementations import marked

    kept = marked(out)[1]  # the implementations table (implementations.py) stays
    if kept:
        text = text.rstrip("\n") + "\n\n" + kept + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
        _log("wrote " + out)
    else:
        sys.stdout.write(text)
    return 0


def sweep_isolated(library, only=None, jobs=1, memory_gb=6.0, timeout=180.0, quiet=True, progress=True):
    """:func:`sweep` in a forked child of this process, which keeps the library's imports and the watched
    presets out of the caller; returns ``{'library', 'versions', 'seconds', 'date', 'results'}``, or
    ``{'status': 'not built', 'reason': ...}`` if the sweep itself failed."""
    def child(library):
        module = _library(library)
        results, seconds = sweep(library, only, jobs=jobs, memory_gb=memory_gb, timeout=timeout,
                                 quiet=quiet, progress=progress)
        return {"library": library, "versions": module.versions(), "seconds": round(seconds, 1),
                "results": results, "date": time.strftime("%Y-%m-%d")}

    return _sandbox.run_all(child, [library], jobs=1, memory_gb=0, seconds=24 * 3600, quiet=False)[0]


def _terminate(signum, frame):
    raise SystemExit(128 + signum)
