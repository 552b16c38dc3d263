"""Per-call overhead of a capture against a forward hook, and the cost of decorating.

A capture adds one call to the recorder at each return of the function; a
forward hook turns a module call from PyTorch's fast path (no hooks: call
``forward``) into the slow path that runs the hooks.  Both store the value.
"""
import timeit
import types

from . import _env
from ._timing import markdown


def _functions():
    # Three functions with the same body and separate code objects, so that
    # capturing one leaves the others as they are.
    def plain(x):
        y = x
        return y

    def captured(x):
        y = x
        return y

    def for_anycapture(x):
        y = x
        return y

    return plain, captured, for_anycapture


def per_call(cfg, anycapture, notes):
    """Return (markdown table, summary dict) of per-call overhead."""
    torch = _env.setup_torch()
    from visualizer import get_local

    plain, captured, for_anycapture = _functions()
    decorated = get_local("y")(captured)
    if decorated is not captured:
        raise AssertionError("inactive get_local did not return the function itself")

    class Trivial(torch.nn.Module):
        def forward(self, x):
            return x

    bare, hooked_keep, hooked_copy = Trivial(), Trivial(), Trivial()
    store = []
    hooked_keep.register_forward_hook(lambda module, args, out: store.append(out))
    hooked_copy.register_forward_hook(
        lambda module, args, out: store.append(out.detach().cpu().numpy().copy()))
    wrapped = anycapture("y")(for_anycapture) if anycapture is not None else None

    def state(active, any_active=False):
        def enter():
            store.clear()
            get_local.clear()
            (get_local.activate if active else get_local.deactivate)()
            if anycapture is not None:
                anycapture.clear()
                (anycapture.activate if any_active else anycapture.deactivate)()
        return enter

    def leave():
        get_local.deactivate()
        if anycapture is not None:
            anycapture.deactivate()

    # (label, statement, enter, baseline label)
    rows = []
    for kind, value, number in (("int", 1, cfg["percall_number"]),
                                ("tensor", torch.zeros(8), cfg["percall_number"] // 10)):
        sfx = " [{}]".format(kind)
        hook = hooked_keep if kind == "int" else hooked_copy
        rows += [
            ("function call" + sfx, plain, state(False), None, value, number),
            ("get_local decorated, inactive" + sfx, captured, state(False), "function call" + sfx,
             value, number),
            ("get_local active (capture)" + sfx, captured, state(True), "function call" + sfx,
             value, number),
        ]
        if wrapped is not None:
            rows += [
                ("anycapture decorated, inactive" + sfx, wrapped, state(False, False),
                 "function call" + sfx, value, number),
                ("anycapture active (capture)" + sfx, wrapped, state(False, True),
                 "function call" + sfx, value, number),
            ]
        rows += [
            ("module call" + sfx, bare, state(False), None, value, number),
            ("module call + forward hook" + sfx, hook, state(False), "module call" + sfx,
             value, number),
        ]

    best = {label: [] for label, *_ in rows}
    for _ in range(cfg["percall_rounds"]):
        for label, fn, enter, _base, value, number in rows:
            enter()
            try:
                timer = timeit.Timer("fn(x)", globals={"fn": fn, "x": value})
                best[label].append(timer.timeit(number) / number * 1e9)
            finally:
                leave()
    # The captures really happened (and only when active).
    get_local.activate()
    captured(3)
    get_local.deactivate()
    if get_local.cache.get(captured.__qualname__) != [3]:
        raise AssertionError("get_local did not capture y: {!r}".format(dict(get_local.cache)))
    get_local.unwatch(captured)

    ns = {label: min(values) for label, values in best.items()}
    median_added = {}
    table = []
    for label, _fn, _enter, base, _value, _number in rows:
        added = ns[label] - ns[base] if base else None
        if base:
            diffs = sorted(v - b for v, b in zip(best[label], best[base]))
            median_added[label] = diffs[len(diffs) // 2]
        table.append([label, "{:.0f}".format(ns[label]),
                      "" if added is None else "{:+.0f}".format(added),
                      "" if added is None else "{:+.0f}".format(median_added[label])])
    summary = {}
    for kind in ("int", "tensor"):
        sfx = " [{}]".format(kind)
        capture = ns["get_local active (capture)" + sfx] - ns["function call" + sfx]
        hook = ns["module call + forward hook" + sfx] - ns["module call" + sfx]
        summary[kind] = {"capture_ns": capture, "hook_ns": hook, "ratio": capture / hook}
        if wrapped is not None:
            summary[kind]["anycapture_ns"] = (ns["anycapture active (capture)" + sfx]
                                              - ns["function call" + sfx])
    notes.append(
        "Per call: [int] stores the int itself (the hook appends its output); [tensor] stores "
        "a NumPy copy of an 8-element tensor (get_local's default storage; the hook does "
        "`out.detach().cpu().numpy().copy()`; anycapture keeps `.detach().cpu().numpy()`, a "
        "view, not a copy). ns per call is the minimum over {} rounds of timeit; 'added' is "
        "against the plain function or the bare module call.".format(cfg["percall_rounds"]))
    text = markdown(["per call", "ns per call", "added ns (min)", "added ns (median)"], table)
    return text, summary


def _fresh(function, n):
    """``n`` new functions, each with its own copy of ``function``'s code object."""
    return [types.FunctionType(function.__code__.replace(), function.__globals__,
                               function.__name__, function.__defaults__, function.__closure__)
            for _ in range(n)]


def decoration(cfg, anycapture, notes):
    """Return (markdown table, summary dict) of the time to decorate one function."""
    _env.setup_torch()
    from timm.layers.attention import Attention
    from visualizer import get_local

    if get_local.active:
        raise AssertionError("decoration benchmark needs get_local inactive")
    _, trivial, _ = _functions()
    cases = [("trivial function, 'y'", trivial, "y", cfg["decorate_n"]),
             ("timm Attention.forward, 'attn'", Attention.forward, "attn",
              max(1, cfg["decorate_n"] // 4))]
    results = {}
    for label, function, name, n in cases:
        probe = _fresh(function, 1)[0]  # leave the real function alone
        original = probe.__code__
        same = get_local(name)(probe) is probe and probe.__code__ is original
        get_local.unwatch(probe)
        kinds = ["get_local, inactive", "get_local, active"]
        if anycapture is not None:
            kinds.append("anycapture")
        times = {k: [] for k in kinds}
        for _ in range(cfg["decorate_rounds"]):
            for kind in kinds:
                functions = _fresh(function, n)
                if kind == "get_local, active":
                    get_local.activate()
                start = timeit.default_timer()
                if kind == "anycapture":
                    for f in functions:
                        anycapture(name)(f)
                else:
                    decorate = get_local(name)
                    for f in functions:
                        decorate(f)
                elapsed = timeit.default_timer() - start
                times[kind].append(elapsed / n * 1e6)
                if kind == "get_local, active":
                    if functions[0].__code__ is function.__code__:
                        raise AssertionError("active decoration did not install rewritten code")
                    get_local.deactivate()
                if kind != "anycapture":
                    for f in functions:
                        get_local.unwatch(f)
        results[label] = (same, {k: min(v) for k, v in times.items()})
    # Switching: what activate() + deactivate() cost with the presets watched,
    # paid again by every `with get_local.capture():` block.
    _env.watch_timm(get_local)
    n_watched = len(get_local.watched())
    switch = []
    scope = []
    for _ in range(cfg["decorate_rounds"]):
        start = timeit.default_timer()
        get_local.activate()
        get_local.deactivate()
        switch.append((timeit.default_timer() - start) * 1e6)
        start = timeit.default_timer()
        with get_local.capture():
            pass
        scope.append((timeit.default_timer() - start) * 1e6)
    table = []
    for label, (same, per_kind) in results.items():
        for kind, us in per_kind.items():
            table.append([label, kind, "{:.1f}".format(us),
                          ("yes" if same else "NO") if kind == "get_local, inactive" else ""])
    switch_label = "switching, {} functions watched (presets)".format(n_watched)
    table.append([switch_label, "activate() + deactivate()", "{:.1f}".format(min(switch)), ""])
    table.append([switch_label, "empty `with get_local.capture():`", "{:.1f}".format(min(scope)),
                  ""])
    notes.append(
        "Decoration: microseconds to decorate one function (minimum over {} rounds of {} "
        "fresh functions each, every one with its own code object). Inactive get_local only "
        "registers the function; active get_local also rewrites and installs the code; "
        "anycapture always rewrites and wraps.".format(cfg["decorate_rounds"],
                                                       cfg["decorate_n"]))
    text = markdown(["decorating", "how", "us per function (or per switch)",
                     "returns the function itself"],
                    table)
    summary = {label: {"same": same, **per_kind} for label, (same, per_kind) in results.items()}
    summary["switch_us"] = min(switch)
    summary["scope_us"] = min(scope)
    return text, summary
