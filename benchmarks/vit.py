"""End to end, timm ViT on CPU: capturing every layer's attention, side by side.

Variants (one batch each, cache or store emptied at the end of the batch, so
allocating and freeing the captures is timed):

* eager forward: ``fused_attn=False`` on every attention module, no capture (the baseline);
* fused forward: the default model (``F.scaled_dot_product_attention``), no capture;
* get_local: the default model, captured at the kernel seam (``watch_attention()``):
  the fused kernel runs, and the probabilities are computed beside it;
* get_local with the eager path forced: ``watch(..., 'attn', overrides={'fused_attn':
  False})``, what the presets did before the seam;
* forward hooks on each ``attn.attn_drop`` (what ``AttentionExtract(method='hook')``
  hooks), storing NumPy copies like get_local's default, or the tensors themselves;
* ``timm.utils.AttentionExtract`` with ``method='fx'`` and ``method='hook'``;
* anycapture, the earlier tool's bytecode splice, on the eager model.
"""
import copy
import types

from . import _env
from ._timing import (Variant, capture_switch, check_maps, e2e_table, interleave,
                      paired_ratio, ratios)

EAGER = "eager forward (no capture)"
FUSED = "fused forward (no capture)"
GL = "get_local seam, NumPy copies (default)"
GL_FORCED = "get_local, eager path forced (fused_attn=False)"
GL_GRAPH = "get_local store='graph' (tensors, no copy)"
GL_SCOPE = "get_local.capture() block per batch"
HOOKS = "forward hooks, NumPy copies"
HOOKS_KEEP = "forward hooks, tensors (no copy)"
AE_FX = "AttentionExtract method='fx'"
AE_HOOK = "AttentionExtract method='hook'"
ANY = "anycapture 0.1.4 (eager model)"
COPIES = "the NumPy copies alone, no forward"


def run(cfg, model_name, anycapture, notes):
    """Return (markdown table, summary dict) for ``model_name`` at ``cfg`` sizes."""
    torch = _env.setup_torch()
    import timm
    from timm.layers.attention import Attention
    from timm.utils import AttentionExtract
    from visualizer import get_local
    from visualizer._get_local import GetLocal

    forced = GetLocal()  # a second get_local: the eager path forced, no seam family
    forced.watch("timm.layers.attention.Attention.forward", "attn",
                 overrides={"fused_attn": False})

    how = _env.watch_timm(get_local)
    torch.manual_seed(0)
    fused = timm.create_model(model_name, pretrained=False, **cfg["vit_kwargs"]).eval()
    if not all(m.fused_attn for m in fused.modules() if isinstance(m, Attention)):
        raise AssertionError("timm built the model without fused attention "
                             "(TIMM_FUSED_ATTN set?): the fused baseline would be eager")
    eager = copy.deepcopy(fused)
    for m in eager.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    eager_modules = [m for m in eager.modules() if isinstance(m, Attention)]
    depth = len(eager_modules)
    size = cfg["vit_kwargs"].get("img_size", 224)
    x = torch.randn(cfg["batch"], 3, size, size)

    store = []
    copy_sources = []  # the reference maps as tensors, for timing their copies alone

    def run_copies():
        [t.numpy().copy() for t in copy_sources]

    def hooks(copy_to_numpy):
        handles = []

        def enter():
            for m in eager_modules:
                if copy_to_numpy:
                    hook = lambda mod, args, out: store.append(out.detach().cpu().numpy().copy())
                else:
                    hook = lambda mod, args, out: store.append(out)
                handles.append(m.attn_drop.register_forward_hook(hook))

        def exit():
            for h in handles:
                h.remove()
            handles.clear()
            store.clear()
        return enter, exit

    def run_hooks():
        eager(x)
        store.clear()

    def configure(**kwargs):
        return capture_switch(get_local, **kwargs)

    def run_get_local():
        fused(x)
        get_local.clear()

    def run_scope():
        with get_local.capture():
            fused(x)

    def run_forced():
        fused(x)
        forced.clear()

    ae_fx = AttentionExtract(eager, method="fx")
    ae_hook = AttentionExtract(copy.deepcopy(eager), method="hook")

    variants = [
        Variant(EAGER, lambda: eager(x)),
        Variant(FUSED, lambda: fused(x)),
        Variant(GL, run_get_local, *configure()),
        Variant(GL_GRAPH, run_get_local, *configure(store="graph")),
        Variant(GL_SCOPE, run_scope),
        Variant(GL_FORCED, run_forced, *capture_switch(forced)),
        Variant(HOOKS, run_hooks, *hooks(True)),
        Variant(HOOKS_KEEP, run_hooks, *hooks(False)),
        Variant(AE_FX, lambda: ae_fx(x)),
        Variant(AE_HOOK, lambda: ae_hook(x)),
    ]
    if anycapture is not None:
        original = Attention.forward
        if get_local.active:
            raise AssertionError("Attention.forward must run its original code here")
        # Wrap a copy: anycapture rewrites the __code__ of what it decorates.
        twin = types.FunctionType(original.__code__.replace(), original.__globals__,
                                  original.__name__, original.__defaults__, original.__closure__)
        wrapper = anycapture("attn")(twin)

        def any_enter():
            for m in eager_modules:
                m.forward = types.MethodType(wrapper, m)
            anycapture.activate()

        def any_exit():
            anycapture.deactivate()
            anycapture.clear()
            for m in eager_modules:
                del m.forward

        def run_any():
            eager(x)
            anycapture.clear()

        variants.append(Variant(ANY, run_any, any_enter, any_exit))

    variants.append(Variant(COPIES, run_copies))

    with torch.no_grad():
        # Correctness gate: every capture equals the hooks' copies before anything is timed.
        reference_out = eager(x)
        enter, exit = hooks(True)
        enter()
        eager(x)
        reference = list(store)
        copy_sources.extend(torch.from_numpy(a.copy()) for a in reference)
        exit()
        check_maps("forward hooks", reference, reference, depth)

        enter, exit = configure()
        enter()
        out = fused(x)
        maps = list(get_local.cache.get(_env.TIMM_KEY, []))
        exit()
        check_maps(GL, maps, reference, depth)
        if not torch.equal(out, fused(x)):
            raise AssertionError("capturing at the seam changed the model output")
        enter, exit = capture_switch(forced)
        enter()
        fused(x)
        check_maps(GL_FORCED, list(forced.cache.get(_env.TIMM_KEY, [])), reference, depth)
        exit()
        enter, exit = configure(store="graph")
        enter()
        fused(x)
        check_maps(GL_GRAPH, [t.numpy() for t in get_local.cache[_env.TIMM_KEY]], reference, depth)
        exit()
        with get_local.capture() as cache:
            fused(x)
        check_maps(GL_SCOPE, cache[_env.TIMM_KEY], reference, depth)
        enter, exit = hooks(False)
        enter()
        eager(x)
        check_maps(HOOKS_KEEP, [t.numpy() for t in store], reference, depth)
        exit()
        check_maps(AE_FX, [t.numpy() for t in ae_fx(x).values()], reference, depth)
        check_maps(AE_HOOK, [t.numpy() for t in ae_hook(x).values()], reference, depth)
        if anycapture is not None:
            any_enter()
            eager(x)
            check_maps(ANY, anycapture.cache["Attention.forward.attn"], reference, depth)
            any_exit()
        fused_gap = float((fused(x) - reference_out).abs().max())
        if get_local.cache.get(_env.TIMM_KEY):
            raise AssertionError("get_local captured while inactive")

        times = interleave(variants, cfg["vit_rounds"], warmup=cfg["warmup"])

    stats = ratios(times, EAGER)
    summary = {
        "how": how,
        "depth": depth,
        "stats": stats,
        "gl_vs_eager": (stats[GL]["ratio"], stats[GL]["ci"]),
        "gl_vs_hooks": paired_ratio(times, GL, HOOKS),
        "gl_vs_fused": paired_ratio(times, GL, FUSED),
        "gl_vs_forced": paired_ratio(times, GL, GL_FORCED),
        "gl_vs_ae_hook": paired_ratio(times, GL, AE_HOOK),
        "gl_vs_ae_fx": paired_ratio(times, GL, AE_FX),
        "gl_graph_vs_hooks_keep": paired_ratio(times, GL_GRAPH, HOOKS_KEEP),
        "rounds": cfg["vit_rounds"],
        "fused_gap": fused_gap,
        "anycapture": anycapture is not None,
        # Off means absent: with capture off, the kernel is torch's own builtin again.
        "seam_off": type(torch.nn.functional.scaled_dot_product_attention).__name__
        == "builtin_function_or_method",
    }
    if anycapture is not None:
        summary["gl_vs_anycapture"] = paired_ratio(times, GL, ANY)
    return e2e_table(stats, variants, "eager"), summary
