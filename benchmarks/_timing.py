"""Side-by-side timing: variants interleaved round by round, summarised as ratios."""
import gc
import math
import statistics
import time


class Variant:
    """One way of running a batch: ``enter`` and ``exit`` are untimed, ``run`` is timed."""

    def __init__(self, name, run, enter=None, exit=None, note=""):
        self.name = name
        self.run = run
        self.enter = enter or (lambda: None)
        self.exit = exit or (lambda: None)
        self.note = note

    def once(self):
        """Run one untimed batch inside enter/exit (warm-up, correctness gate)."""
        self.enter()
        try:
            return self.run()
        finally:
            self.exit()


def interleave(variants, rounds, warmup=1):
    """Time every variant once per round, rotating the order; return {name: [seconds]}.

    Variants run A B C, B C A, C A B, ... so that drift of a noisy machine and
    the position in a round weigh on all of them alike.
    """
    for _ in range(warmup):
        for variant in variants:
            variant.once()
    times = {v.name: [] for v in variants}
    for r in range(rounds):
        k = r % len(variants)
        for variant in variants[k:] + variants[:k]:
            variant.enter()
            try:
                gc.collect()
                start = time.perf_counter()
                variant.run()
                times[variant.name].append(time.perf_counter() - start)
            finally:
                variant.exit()
    return times


def quantile(values, q):
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def ratios(times, baseline):
    """Per variant: median ms, ratio to ``baseline`` (median of per-round ratios,
    its ~95% confidence interval, its 25-75% range, and min over min)."""
    base = times[baseline]
    out = {}
    for name, values in times.items():
        per_round = [v / b for v, b in zip(values, base)]
        out[name] = {
            "ci": median_ci(per_round),
            "median_ms": statistics.median(values) * 1e3,
            "min_ms": min(values) * 1e3,
            "ratio": statistics.median(per_round),
            "ratio_p25": quantile(per_round, 0.25),
            "ratio_p75": quantile(per_round, 0.75),
            "ratio_min": min(values) / min(base),
        }
    return out


def markdown(headers, rows):
    """A GitHub table as text."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def e2e_table(stats, variants, baseline):
    """The markdown table of an end-to-end benchmark, one row per variant."""
    rows = []
    for variant in variants:
        s = stats[variant.name]
        rows.append([
            variant.name,
            "{:.1f}".format(s["median_ms"]),
            "{:.3f}".format(s["ratio"]),
            "{:.3f}-{:.3f}".format(*s["ci"]),
            "{:.3f}".format(s["ratio_min"]),
        ])
    return markdown(["variant", "median ms", "x {} (median)".format(baseline),
                     "95% CI of the median", "x (min/min)"], rows)


def median_ci(values, z=1.96):
    """A distribution-free ~95% confidence interval of the median (order statistics)."""
    v = sorted(values)
    n = len(v)
    half = z * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)))
    hi = min(n - 1, int(math.ceil(n / 2 + half)) - 1)
    return v[lo], v[hi]


def paired_ratio(times, a, b):
    """Time(a) / time(b) per round (both measured in the same round): (median, ci)."""
    per_round = [x / y for x, y in zip(times[a], times[b])]
    return statistics.median(per_round), median_ci(per_round)


def check_maps(name, got, want, depth, atol=1e-5):
    """Raise unless ``got`` holds ``depth`` arrays equal to ``want`` (the reference)."""
    import numpy as np

    got = [np.asarray(g) for g in got]
    if len(got) != depth:
        raise AssertionError("{}: captured {} maps, expected {}".format(name, len(got), depth))
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise AssertionError("{}: map {} has shape {}, expected {}".format(
                name, i, g.shape, w.shape))
        if not np.allclose(g, w, rtol=1e-5, atol=atol):
            raise AssertionError("{}: map {} differs from the reference by up to {:.3g}".format(
                name, i, float(np.abs(g - w).max())))


def capture_switch(get_local, **kwargs):
    """``(enter, exit)`` for a variant: capture on with these storage settings, then off."""
    saved = {}

    def enter():
        saved.update(get_local.configure(**kwargs))
        get_local.activate()

    def exit():
        get_local.deactivate()
        get_local.configure(**saved)
        get_local.clear()

    return enter, exit
