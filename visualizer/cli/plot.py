"""``visualizer plot``: a PNG per captured call of every attention-shaped key of a saved file."""
import argparse
import fnmatch
import re
from typing import Any, List

from .._errors import VisualizerError
from ..attention import why_not_maps
from ._common import (BAD_INPUT, FORMATTER, OK, Say, add_quiet, add_sample,
                      display_dir, error, load, require, write_figure)

DEFAULT_LIMIT = 12

_DESCRIPTION = """\
Draw every attention-shaped capture in a file saved by 'visualizer run' or
get_local.save: arrays shaped (batch, heads, N, N), (heads, N, N) or (N, N)
get one figure per captured call with every head and their mean (the first
sample of a batch, or --sample); tokens and layer names saved with
visualizer.views.save(path, cache, tokens=..., layers=...) label them.  A key that holds the steps of generate()
(each layer's prompt step, then one row per new token) gets, per layer, the
stitched matrix over prompt and generated positions, and one figure of what
each generated token attended to.  Other arrays are skipped with a note; a
file with nothing to draw is an error (exit status {})."""


def add_parser(commands: Any) -> None:
    """Add ``plot`` to the subparsers ``commands``."""
    parser = commands.add_parser(
        "plot", help="figures from a file saved by 'run' or get_local.save",
        description=_DESCRIPTION.format(BAD_INPUT), formatter_class=FORMATTER)
    parser.add_argument("file", metavar="FILE",
                        help="a .npz file written by 'visualizer run' or get_local.save "
                             "(or a rank manifest, or a stream folder)")
    parser.add_argument("--out", "-o", metavar="DIR", required=True,
                        help="folder for the PNG files (created if needed)")
    parser.add_argument("--key", "-k", metavar="PATTERN", action="append", default=[],
                        help="plot only keys matching this shell pattern "
                             "(e.g. 'Attention*'); repeatable")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                        help="at most N figures per key, the first N calls "
                             "(default: %(default)s; 0 for all)")
    add_sample(parser, "draw")
    add_quiet(parser, argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, say: Say) -> int:
    """Write the figures of ``args.file`` into ``args.out``; nothing to draw is bad input."""
    require("numpy", "plot")
    if args.limit < 0:
        raise error("--limit {}: pass a positive number, or 0 for all".format(args.limit))
    cache, context = load(args.file, "plot", say, context=True)
    keys = [k for k in cache if not args.key or any(fnmatch.fnmatchcase(k, p) for p in args.key)]
    if not keys:
        raise error("{} has no key matching {}; its keys are: {}".format(
            args.file, " or ".join(repr(p) for p in args.key), ", ".join(cache)))
    require("matplotlib", "plot")

    from ..views import figures

    say("plotting {} ...".format(args.file))
    written = []  # type: List[str]
    for key in keys:
        values = cache[key]
        if not values:
            say("  {}: no values, skipped".format(key))
            continue
        if _plot_generation(key, values, args, say, written):
            continue
        reasons = [why_not_maps(v, args.sample) for v in values]
        plottable = [i for i, r in enumerate(reasons) if r is None]
        if not plottable:
            say("  {}: skipped: {}".format(key, reasons[0]))
            continue
        chosen = plottable if args.limit == 0 else plottable[:args.limit]
        # what views.save kept beside the captures: used when it fits this key
        names = context.get("layers")
        names = names if names and len(names) == len(values) else None
        for i in chosen:
            array = values[i]
            sample = ""
            if array.ndim == 4 and array.shape[0] > 1:
                sample = ", sample {} of {}".format(args.sample, array.shape[0])
            heads = array.shape[-3] if array.ndim >= 3 else 1
            tokens = context.get("tokens")
            tokens = tokens if tokens and len(tokens) == array.shape[-1] else None
            title = ("{} ({}, call {} of {}){}".format(names[i], key, i + 1, len(values), sample)
                     if names else "{}: call {} of {}{}".format(key, i + 1, len(values), sample))
            fig = figures.plot_heads(array, sample=args.sample, mean=heads > 1, title=title,
                                     tokens=tokens)
            write_figure(fig, args.out, _file_name(key, i, len(values)), written)
        notes = []
        if len(chosen) < len(plottable):
            notes.append("the first {} of {} calls; --limit 0 for all".format(
                len(chosen), len(plottable)))
        if len(plottable) < len(values):
            first = next(r for r in reasons if r is not None)
            notes.append("{} of {} calls skipped: {}".format(
                len(values) - len(plottable), len(values), first))
        say("  {}: {} figure{}{}".format(key, len(chosen), "" if len(chosen) == 1 else "s",
                                         " ({})".format("; ".join(notes)) if notes else ""))
    if not written:
        raise error("no attention maps to plot in {}: no key holds arrays shaped (batch, "
                    "heads, N, N), (heads, N, N) or (N, N) with a sample {}; without -q, each "
                    "key skipped is named with the reason".format(args.file, args.sample))
    say("wrote {} figure{} to {}".format(
        len(written), "" if len(written) == 1 else "s", display_dir(args.out)))
    return OK


def _file_name(key: str, index: int, count: int) -> str:
    """Return the PNG name of call ``index`` of ``count`` of ``key``: safe, zero-padded."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("._") or "key"
    return "{}_{:0{}d}.png".format(safe, index, max(2, len(str(count - 1))))


def _plot_generation(key: str, values: list, args: argparse.Namespace, say: Say,
                     written: List[str]) -> bool:
    """Draw ``key`` as a generation if its values are decoding steps; return whether it was.

    The file has no module names, so layers are told apart by shape
    (``visualizer.generation.split_layers``).
    """
    from ..generation import split_layers, stitch
    from ..views.figures import _generation_figures

    try:
        layers = split_layers(values)
        stitched = [stitch(steps) for steps in layers]
    except VisualizerError:
        return False
    batch = stitched[0].shape[0]
    if not -batch <= args.sample < batch:
        say("  {}: skipped: a batch of {}, which has no sample {}".format(
            key, batch, args.sample))
        return True
    per_layer, last = _generation_figures(stitched, len(layers[0]), sample=args.sample,
                                          limit=args.limit, title=key)
    for i, fig in enumerate(per_layer):
        write_figure(fig, args.out, _file_name(key + "_generation", i, len(layers)), written)
    write_figure(last, args.out,
                 _file_name(key + "_generated_tokens", len(layers) - 1, len(layers)), written)
    say("  {}: generation of {} steps over {} layers: {} figures".format(
        key, len(layers[0]), len(layers), len(per_layer) + 1))
    return True
