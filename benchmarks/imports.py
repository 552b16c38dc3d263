"""Import time of timm with the presets on (``get_local.watch_attention()`` first) and off.

Each measurement is a fresh process: ``import visualizer``, then (on) the
presets, then the timed ``import timm``, once with torch not yet imported and
once with torch imported before the clock starts.  On and off alternate.
"""
import json
import statistics
import sys

from . import _env
from ._timing import markdown

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from visualizer import get_local
t1 = time.perf_counter()
if {presets}:
    get_local.watch_attention()
if {torch_first}:
    import torch
t2 = time.perf_counter()
import timm
t3 = time.perf_counter()
watched = sorted(get_local.watched())
print(json.dumps({{"visualizer": t1 - t0, "timm": t3 - t2, "watched": watched}}))
"""


def _command(presets, torch_first):
    return [sys.executable, "-c", CHILD.format(presets=presets, torch_first=torch_first)]


def run(cfg, notes):
    """Return (markdown table, summary dict), or (reason, None) without presets."""
    if not _env.has_presets():
        return ("not measured: get_local.watch_attention() does not exist in this checkout "
                "(the presets have not landed)"), None
    times = {}
    watched = {}
    visualizer = []
    for _ in range(cfg["import_rounds"]):
        cells = [(t, p) for t in (False, True) for p in (False, True)]
        outputs = _env.run_children({cell: _command(cell[1], cell[0]) for cell in cells},
                                    cfg["parallel_children"])
        for cell in cells:
            result = json.loads(outputs[cell].strip().splitlines()[-1])
            times.setdefault(cell, []).append(result["timm"])
            watched[cell] = result["watched"]
            visualizer.append(result["visualizer"])
    for torch_first in (False, True):
        if not any("Attention.forward" in w for w in watched[(torch_first, True)]):
            raise AssertionError("with presets on, importing timm did not watch "
                                 "Attention.forward: watched {}".format(
                                     watched[(torch_first, True)]))
        if watched[(torch_first, False)]:
            raise AssertionError("presets off but watched: {}".format(
                watched[(torch_first, False)]))
    rows = []
    summary = {}
    for torch_first, label in ((False, "import timm (torch included)"),
                               (True, "import timm (torch already imported)")):
        off = statistics.median(times[(torch_first, False)]) * 1e3
        on = statistics.median(times[(torch_first, True)]) * 1e3
        rows.append([label, "{:.0f}".format(off), "{:.0f}".format(on), "{:+.0f}".format(on - off),
                     "{:.3f}".format(on / off)])
        summary[label] = {"off_ms": off, "on_ms": on, "ratio": on / off}
    summary["visualizer_ms"] = statistics.median(visualizer) * 1e3
    notes.append(
        "Imports: median of {} fresh processes per cell, presets on and off alternating; "
        "`from visualizer import get_local` itself takes {:.0f} ms (median).".format(
            cfg["import_rounds"], summary["visualizer_ms"]))
    text = markdown(["import", "presets off ms", "presets on ms", "added ms", "on / off"], rows)
    return text, summary
