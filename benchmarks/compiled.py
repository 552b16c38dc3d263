"""ViT-S/16 under ``torch.compile(model, fullgraph=True)``: capturing from the compiled graph.

Variants (one batch each; captures emptied at the end of the batch, as in vit.py):

* compiled fused: the default model (``F.scaled_dot_product_attention``) compiled,
  no capture (the baseline); its attention modules read ``F`` from a namespace whose
  ``scaled_dot_product_attention`` is always torch's own, so the kernel seam, in place
  while capture is on, never reaches it;
* compiled, kernel seam: the default model compiled, its fused path captured at the
  seam (``watch_attention('kernel')``): the graph calls torch's kernel as the baseline
  does and the operator ``visualizer::attention_call`` once per layer, which computes
  the probabilities at run time; default storage (NumPy copies);
* compiled get_local: the same default model compiled with
  ``watch('timm.layers.attention.Attention.forward', 'attn', overrides={'fused_attn':
  False})`` capturing (the eager path); the
  graph dynamo traces reads ``fused_attn`` as False and calls the operator
  ``visualizer::record`` once per layer; default storage (NumPy copies);
* compiled unfused: ``fused_attn = False`` on every attention module, no capture: the
  graph above without the records, so the reader can tell the cost of the unfused
  attention from the cost of capturing;
* eager get_local: the default model, not compiled, capturing (vit.py's get_local row).

Capture stays on for the whole timed region. Dynamo does not guard on a function's
``__code__``, so visualizer makes it compile again every frame that inlined a captured
function whenever capture starts or stops: switching per batch would time a compilation
of ViT-S instead of a forward. The two models without capture run a copy of
``Attention.forward``'s code object instead (the same bytecode, installed as each
attention module's ``forward``), which the presets do not watch, so capture being on
does not reach them; the gate checks that they capture nothing and that no graph is
compiled while timing. What one switch costs is timed apart, once each way, afterwards.
"""
import copy
import time
import types

from . import _env
from ._timing import Variant, capture_switch, e2e_table, interleave, paired_ratio, ratios

FUSED = "compiled, fused (no capture)"
SEAM = "compiled, fused, kernel seam, NumPy copies"
GL = "compiled, get_local, NumPy copies (default)"
UNFUSED = "compiled, fused_attn=False (no capture)"
EAGER_GL = "not compiled, get_local, NumPy copies"

MODEL = "vit_small_patch16_224"


def run(cfg, notes):
    """Return (markdown table, summary dict) for ViT-S/16 compiled with ``cfg`` sizes."""
    torch = _env.setup_torch()
    import timm
    from timm.layers.attention import Attention
    from timm.utils import AttentionExtract
    from torch._dynamo.utils import counters
    from visualizer import get_local

    get_local.unwatch_attention()
    how = _env.watch_timm_eager(get_local)
    get_local.watch_attention(["kernel"])  # the seam keeps the kernel calls of the SEAM model
    if get_local.active:
        raise AssertionError("Attention.forward must run its original code here")
    backend = cfg["compile_backend"]
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, **cfg["vit_kwargs"]).eval()
    if not all(m.fused_attn for m in model.modules() if isinstance(m, Attention)):
        raise AssertionError("timm built the model without fused attention "
                             "(TIMM_FUSED_ATTN set?): the fused baseline would be eager")
    fused = _unwatched_copy(model, Attention, fused_attn=True, plain_kernel=torch)
    seam = _unwatched_copy(model, Attention, fused_attn=True)
    unfused = _unwatched_copy(model, Attention, fused_attn=False)
    reference_model = copy.deepcopy(model)
    for m in reference_model.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    depth = sum(isinstance(m, Attention) for m in model.modules())
    size = cfg["vit_kwargs"].get("img_size", 224)
    x = torch.randn(cfg["batch"], 3, size, size)

    compiled = {name: torch.compile(m, backend=backend, fullgraph=True)
                for name, m in ((FUSED, fused), (SEAM, seam), (GL, model),
                                (UNFUSED, unfused))}
    counts = {GL: [], SEAM: [], EAGER_GL: []}  # maps captured per timed batch

    def captured(name, forward):
        def run_batch():
            forward(x)
            counts[name].append(len(get_local.cache.get(_env.TIMM_KEY, ())))
            get_local.clear()
        return run_batch

    variants = [
        Variant(FUSED, lambda: compiled[FUSED](x)),
        Variant(SEAM, captured(SEAM, compiled[SEAM])),
        Variant(GL, captured(GL, compiled[GL])),
        Variant(UNFUSED, lambda: compiled[UNFUSED](x)),
        Variant(EAGER_GL, captured(EAGER_GL, model)),
    ]

    compile_s = {}
    enter, exit = capture_switch(get_local)
    with torch.no_grad():
        # Correctness gate, capture off: the eager output, and timm's own extraction
        # (hooks on attn_drop) from the uncompiled model with the fused path off.
        want_out = model(x)
        reference = {name[:-len(".attn_drop")]: t.numpy() for name, t in
                     AttentionExtract(reference_model, method="hook")(x).items()}
        enter()
        try:
            # Each compiled model's first call compiles it, with capture on as timed.
            for name in (GL, SEAM, FUSED, UNFUSED):
                start = time.perf_counter()
                out = compiled[name](x)
                compile_s[name] = time.perf_counter() - start
                _check_output(torch, name, out, want_out)
                if name in (GL, SEAM):
                    _check_maps(name, get_local.by_module(model if name == GL else seam),
                                reference, depth)
                elif get_local.cache.get(_env.TIMM_KEY):
                    raise AssertionError("{}: captured {} maps; its attention ran the watched "
                                         "code".format(name, len(get_local.cache[_env.TIMM_KEY])))
                get_local.clear()
            _check_output(torch, EAGER_GL, model(x), want_out)
            _check_maps(EAGER_GL, get_local.by_module(model), reference, depth)
            get_local.clear()

            graphs = counters["stats"]["unique_graphs"]
            times = interleave(variants, cfg["compiled_rounds"], warmup=cfg["compiled_warmup"])
            recompiled = counters["stats"]["unique_graphs"] - graphs
            switch_s = _switching(get_local, lambda: compiled[GL](x), depth)
        finally:
            exit()
    torch._dynamo.reset()
    if recompiled:
        raise AssertionError("dynamo compiled {} graph(s) while timing: a timed batch "
                             "included compiling".format(recompiled))
    for name, per_batch in counts.items():
        if set(per_batch) != {depth}:
            raise AssertionError("{}: maps captured per timed batch {}, expected {}".format(
                name, sorted(set(per_batch)), depth))

    stats = ratios(times, FUSED)
    notes.append(
        "Compiled ({}, fullgraph=True): the first call of each compiled model, which "
        "compiles it, took {:.1f} s (fused), {:.1f} s (kernel seam), {:.1f} s (capturing the "
        "eager path), {:.1f} s (fused_attn=False){}; untimed. Capture stayed on while timing; the models without "
        "capture run a copy of Attention.forward's code, which capture does not touch. "
        "Each switch makes dynamo compile the frame again: the first call after "
        "deactivate() took {:.1f} s, after activate() {:.1f} s.".format(
            backend, compile_s[FUSED], compile_s[SEAM], compile_s[GL], compile_s[UNFUSED],
            " (inductor's on-disk cache shortens repeat runs)" if backend == "inductor" else "",
            switch_s["off"], switch_s["on"]))
    summary = {
        "how": how,
        "backend": backend,
        "depth": depth,
        "stats": stats,
        "compile_s": compile_s,
        "switch_s": switch_s,
        "gl_vs_fused": (stats[GL]["ratio"], stats[GL]["ci"]),
        "seam_vs_fused": (stats[SEAM]["ratio"], stats[SEAM]["ci"]),
        "gl_vs_unfused": paired_ratio(times, GL, UNFUSED),
        "unfused_vs_fused": (stats[UNFUSED]["ratio"], stats[UNFUSED]["ci"]),
        "eager_gl_vs_gl": paired_ratio(times, EAGER_GL, GL),
        "rounds": cfg["compiled_rounds"],
    }
    return e2e_table(stats, variants, "compiled fused"), summary


def _switching(get_local, forward, depth):
    """Time the first batch after capture stops and after it starts again; check its maps.

    Each switch makes dynamo compile the model's frame again (see the module docstring).
    """
    seconds = {}
    for label, switch, want in (("off", get_local.deactivate, 0),
                                ("on", get_local.activate, depth)):
        switch()
        start = time.perf_counter()
        forward()
        seconds[label] = time.perf_counter() - start
        got = len(get_local.cache.get(_env.TIMM_KEY, ()))
        get_local.clear()
        if got != want:
            raise AssertionError("capture {}: the compiled model captured {} maps, expected {}"
                                 .format(label, got, want))
    return seconds


def _unwatched_copy(model, attention_class, fused_attn, plain_kernel=None):
    """A copy of ``model`` whose attention modules run a copy of ``forward``'s code.

    With ``plain_kernel`` (torch), that code's ``F`` is a namespace whose
    ``scaled_dot_product_attention`` is torch's own even while the seam is in place.
    """
    twin = copy.deepcopy(model)
    original = attention_class.forward
    namespace = original.__globals__
    if plain_kernel is not None:
        functional = types.ModuleType("functional_without_the_seam")
        functional.__dict__.update(vars(plain_kernel.nn.functional))
        functional.scaled_dot_product_attention = \
            plain_kernel._C._nn.scaled_dot_product_attention
        namespace = dict(namespace, F=functional)
    forward = types.FunctionType(original.__code__.replace(), namespace,
                                 original.__name__, original.__defaults__, original.__closure__)
    for m in twin.modules():
        if isinstance(m, attention_class):
            m.forward = types.MethodType(forward, m)
            m.fused_attn = fused_attn
    return twin


def _check_output(torch, name, out, want):
    if not torch.allclose(out, want, rtol=1e-4, atol=1e-4):
        raise AssertionError("{}: the output differs from the eager model's by up to {:.3g}"
                             .format(name, float((out - want).abs().max())))


def _check_maps(name, got, want, depth):
    """Raise unless ``got`` (``by_module``) holds one map per layer equal to ``want``'s.

    rtol 1e-4, not ``_timing.check_maps``' 1e-5: a compiled graph may reorder the
    floating-point arithmetic of the softmax.
    """
    import numpy as np

    if sorted(got) != sorted(want) or sum(len(maps) for maps in got.values()) != depth:
        raise AssertionError("{}: captured {}, expected one map from each of {}".format(
            name, {k: len(v) for k, v in got.items()}, sorted(want)))
    for module, (value,) in got.items():
        np.testing.assert_allclose(value, want[module], rtol=1e-4, atol=1e-5,
                                   err_msg="{}: the map of {}".format(name, module))
