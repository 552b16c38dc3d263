"""``generate()`` of a tiny random Llama with and without capture, side by side; peak memory.

The model: 2 layers, 4 heads, grouped-query attention with 2 key/value heads,
width 64, random weights built from a config (offline).  Timed, interleaved
round by round: ``generate`` of ``gen_new`` tokens on the default (SDPA)
model without capture (the baseline), under ``get_local.capture(queries=-1)``
(each step's new row, at the kernel seam), under ``get_local.capture()``
(full maps), and the eager model with and without
``output_attentions=True``.  The capture rows need the kernel seam
(``capture(queries=...)``); without it they are skipped with a note.  Before
anything is timed, a gate checks that capture leaves the generated tokens
unchanged and that the stitched capture equals the eager attention of one
forward pass over the generated sequence.

Memory: one fresh process per variant (as ``benchmarks.memory``), a long
prompt, peak RSS of one ``generate`` with full maps against ``queries=-1``.
"""
import argparse
import json
import sys

from . import _env
from ._timing import (Variant, capture_switch, e2e_table, interleave, markdown, paired_ratio,
                      ratios)

SDPA = "SDPA generate (default, no capture)"
ROWS = "capture(queries=-1): new rows"
FULL = "capture(): full maps"
EAGER = "eager generate (no capture)"
OUTPUT = "eager generate(output_attentions=True)"

MEMORY_VARIANTS = [("none", "no capture"), ("full", "capture(): full maps"),
                   ("rows", "capture(queries=-1): new rows")]


def build(torch, eager=False):
    """The benchmark's tiny random Llama (same weights every time)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=0, eos_token_id=None, bos_token_id=1)
    kwargs = {"attn_implementation": "eager"} if eager else {}
    model = transformers.LlamaForCausalLM._from_config(config, **kwargs).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def has_seam(get_local):
    """Whether this visualizer captures at the kernel seam with ``queries=`` ."""
    import inspect

    return "queries" in inspect.signature(get_local.capture).parameters


def _generate(model, ids, new, **kwargs):
    return model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=new,
                          do_sample=False, **kwargs)


def run(cfg, notes):
    """Return (markdown table, summary dict)."""
    torch = _env.setup_torch()
    import numpy as np
    from visualizer import get_local
    from visualizer.generation import steps_by_module, stitch

    sdpa = build(torch)
    eager = build(torch, eager=True)
    new, batch = cfg["gen_new"], cfg["gen_batch"]
    ids = torch.randint(3, 256, (batch, cfg["gen_prompt"]), generator=torch.Generator()
                        .manual_seed(1))
    seam = has_seam(get_local)
    if seam:
        get_local.watch_attention()

    with torch.no_grad():
        tokens = _generate(sdpa, ids, new)
        out = _generate(eager, ids, new, output_attentions=True, return_dict_in_generate=True)
        if not torch.equal(out.sequences, tokens):
            raise AssertionError("the eager and SDPA models generated different tokens")
        reference = eager(tokens[:, :-1], output_attentions=True).attentions
        for layer in range(2):
            got = stitch([step[layer] for step in out.attentions])
            if not np.allclose(got, reference[layer].numpy(), atol=1e-5):
                raise AssertionError("output_attentions steps do not stitch to one forward")
        if seam:
            for queries, name in ((None, FULL), (-1, ROWS)):
                options = {} if queries is None else {"queries": queries}
                with get_local.capture(**options) as cache:
                    captured = _generate(sdpa, ids, new)
                if not torch.equal(captured, tokens):
                    raise AssertionError("{}: capture changed the generated tokens".format(name))
                steps = steps_by_module(sdpa, cache)
                for layer in range(2):
                    got = stitch(steps["model.layers.{}.self_attn".format(layer)])
                    want = reference[layer].numpy()
                    if queries is not None:
                        want = want[..., cfg["gen_prompt"] - 1:, :]
                    if got.shape != want.shape or not np.allclose(got, want, atol=1e-5):
                        raise AssertionError("{}: the stitched capture of layer {} differs "
                                             "from one eager forward".format(name, layer))

        def captured(**options):
            def go():
                with get_local.capture(**options):
                    _generate(sdpa, ids, new)
            return go

        variants = [Variant(SDPA, lambda: _generate(sdpa, ids, new))]
        if seam:
            variants += [Variant(ROWS, captured(queries=-1)), Variant(FULL, captured())]
        variants += [Variant(EAGER, lambda: _generate(eager, ids, new)),
                     Variant(OUTPUT, lambda: _generate(eager, ids, new, output_attentions=True,
                                                       return_dict_in_generate=True))]
        times = interleave(variants, cfg["gen_rounds"], warmup=cfg["warmup"])
    stats = ratios(times, SDPA)
    summary = {"seam": seam, "stats": stats}
    if seam:
        summary["rows_vs_sdpa"] = paired_ratio(times, ROWS, SDPA)
        summary["full_vs_sdpa"] = paired_ratio(times, FULL, SDPA)
    else:
        notes.append("generation: the capture rows need the kernel seam "
                     "(get_local.capture(queries=...)), which this checkout lacks; skipped.")
    notes.append("generation: tiny random Llama (2 layers, 4 heads, 2 key/value heads, width "
                 "64), batch {}, prompt {} tokens, {} new tokens, greedy, {} rounds; the gate "
                 "checked that {}the eager steps stitch to one forward.".format(
                     batch, cfg["gen_prompt"], new, cfg["gen_rounds"],
                     "capture leaves the tokens unchanged and " if seam else ""))
    text = e2e_table(stats, variants, "SDPA generate")
    if seam:
        gpt_text, summary["gpt2"] = gpt2_small(cfg, notes)
        text += "\n\n" + gpt_text
        memory_text, summary["memory"] = memory(cfg, notes)
        text += "\n\n" + memory_text
        call_text, summary["per_call"] = per_call(cfg, notes)
        text += "\n\n" + call_text
    return text, summary


# ---------------------------------------------------------------------------
# One kernel call of a decoding step: the kernel, its probabilities, capturing it
# ---------------------------------------------------------------------------

KERNEL = "the module's kernel call (no capture)"
PROBS = "kernel.probabilities(call, queries=-1) alone"
ARITHMETIC = "the kernel call, then its probabilities, kept (no capture)"
CAPTURING = "the kernel call, capture(queries=-1)"


def per_call(cfg, notes):
    """Time one decoding step's kernel call: alone, with its arithmetic, and captured.

    The shapes of the tiny Llama's step (``q`` ``(1, 4, 1, 16)``, ``k``/``v``
    ``(1, 2, 128, 16)``, grouped-query heads), without a mask (what
    ``generate()`` passes for an unpadded batch) and with a boolean mask (a
    padded batch).  The arithmetic is the kernel call followed by its
    probabilities (``kernel.probabilities``, the new row), each kept as the
    capture keeps it, with no capture; the seam's own work per call, its
    bookkeeping, is the captured call less that (minimum per call over the
    rounds of each).  The target is 10 µs.  One thread: these small ops use
    one, and a second only adds noise.
    """
    torch = _env.setup_torch()
    from visualizer import get_local
    from visualizer.integrations import kernel

    F = torch.nn.functional
    get_local.watch_attention()  # the seam's 'kernel' family keeps the calls

    class Step(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    step = Step()
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 1, 16, generator=generator)
    k, v = (torch.randn(1, 2, 128, 16, generator=generator) for _ in range(2))
    bool_mask = torch.ones(1, 1, 1, 128, dtype=torch.bool)
    bool_mask[..., :5] = False  # left padding
    n = cfg["seam_calls"]
    table, summary = [], {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for label, mask in (("no mask", None), ("boolean mask", bool_mask)):
                call = kernel.Call(q, k, v, attn_mask=mask, enable_gqa=True)
                with get_local.capture(queries=-1) as cache:
                    step(q, k, v, mask)
                (key,) = cache  # the calling module's method
                (got,) = cache[key]
                want = kernel.probabilities(call, -1).numpy()
                if not (got.shape == want.shape == (1, 4, 1, 128) and (got == want).all()):
                    raise AssertionError("per call ({}): the captured row is not the call's "
                                         "probabilities".format(label))
                us = _per_call_times(get_local, kernel, step, (q, k, v, mask), n,
                                     cfg["seam_rounds"])
                bookkeeping = us[CAPTURING] - us[ARITHMETIC]
                summary[label] = dict(us, bookkeeping=bookkeeping)
                for name in (KERNEL, PROBS, ARITHMETIC, CAPTURING):
                    table.append([label, name, "{:.1f}".format(us[name])])
                table.append([label, "bookkeeping (capturing - arithmetic)",
                              "{:.1f}".format(bookkeeping)])
    finally:
        torch.set_num_threads(threads)
    notes.append("generation, per kernel call: one decoding step's call of the tiny Llama's "
                 "shapes, q (1, 4, 1, 16), k/v (1, 2, 128, 16), grouped-query heads, 1 thread; "
                 "{} calls per round, {} rounds interleaved, the minimum per call; the gate "
                 "checked that the captured row equals the call's probabilities.".format(
                     n, cfg["seam_rounds"]))
    return markdown(["decoding step", "per kernel call", "µs (min)"], table), summary


def _per_call_times(get_local, kernel, step, args, n, rounds):
    """{variant: µs per call} of ``per_call``'s variants, interleaved round by round."""
    q, k, v, mask = args
    kept = []

    def arithmetic():
        out = step(q, k, v, mask)
        kept.append(kernel.probabilities(kernel.Call(q, k, v, attn_mask=mask, enable_gqa=True),
                                         -1).numpy())
        return out

    def loop(fn):
        def run():
            for _ in range(n):
                fn()
        return run

    call = kernel.Call(q, k, v, attn_mask=mask, enable_gqa=True)
    variants = [Variant(KERNEL, loop(lambda: step(q, k, v, mask))),
                Variant(PROBS, loop(lambda: kernel.probabilities(call, -1))),
                Variant(ARITHMETIC, loop(arithmetic), exit=kept.clear),
                Variant(CAPTURING, loop(lambda: step(q, k, v, mask)),
                        *capture_switch(get_local, queries=-1))]
    times = interleave(variants, rounds, warmup=1)
    return {name: min(values) / n * 1e6 for name, values in times.items()}


# ---------------------------------------------------------------------------
# A GPT-2-small-size model: where the seam's cost per call meets a real kernel
# ---------------------------------------------------------------------------

GPT2_SDPA = "GPT-2 small size, SDPA generate (no capture)"
GPT2_ROWS = "GPT-2 small size, capture(queries=-1)"


def build_gpt2(torch, cfg):
    """A GPT-2 of ``cfg['gpt2_layers']`` layers, width 768, 12 heads (124M parameters at 12), random."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=cfg["gpt2_layers"], n_embd=cfg["gpt2_width"],
                                     n_head=12, n_positions=1024, vocab_size=50257,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def gpt2_small(cfg, notes):
    """Time ``generate`` of the GPT-2-size model with and without ``capture(queries=-1)``."""
    torch = _env.setup_torch()
    from visualizer import get_local
    from visualizer.generation import steps_by_module

    model = build_gpt2(torch, cfg)
    parameters = sum(p.numel() for p in model.parameters())
    ids = torch.randint(3, 50257, (1, cfg["gpt2_prompt"]),
                        generator=torch.Generator().manual_seed(2))
    new = cfg["gpt2_new"]
    with torch.no_grad():
        tokens = _generate(model, ids, new)
        with get_local.capture(queries=-1) as cache:
            captured = _generate(model, ids, new)
        if not torch.equal(captured, tokens):
            raise AssertionError("GPT-2: capture changed the generated tokens")
        steps = steps_by_module(model, cache)
        if len(steps) != cfg["gpt2_layers"] or any(len(s) != new for s in steps.values()):
            raise AssertionError("GPT-2: expected {} steps in each of {} layers, got {}".format(
                new, cfg["gpt2_layers"], {k: len(v) for k, v in steps.items()}))

        def rows():
            with get_local.capture(queries=-1):
                _generate(model, ids, new)

        variants = [Variant(GPT2_SDPA, lambda: _generate(model, ids, new)),
                    Variant(GPT2_ROWS, rows)]
        times = interleave(variants, cfg["gpt2_rounds"], warmup=1)
    stats = ratios(times, GPT2_SDPA)
    notes.append("generation, GPT-2 small size: {} layers, width {}, 12 heads, {:.0f}M "
                 "parameters (random), batch 1, prompt {} tokens, {} new tokens, greedy, {} "
                 "rounds; the gate checked that capture leaves the tokens unchanged and keeps "
                 "one row per step and layer.".format(
                     cfg["gpt2_layers"], cfg["gpt2_width"], parameters / 1e6,
                     cfg["gpt2_prompt"], new, cfg["gpt2_rounds"]))
    return e2e_table(stats, variants, "GPT-2 generate"), {
        "rows_vs_sdpa": paired_ratio(times, GPT2_ROWS, GPT2_SDPA), "parameters": parameters}


# ---------------------------------------------------------------------------
# Peak memory: one child process per variant
# ---------------------------------------------------------------------------

def child(variant, prompt, batch, new):
    torch = _env.setup_torch()
    from visualizer import get_local

    from .memory import _peak, _reset_peak, _status

    model = build(torch)
    get_local.watch_attention()
    ids = torch.randint(3, 256, (batch, prompt), generator=torch.Generator().manual_seed(1))
    options = {"rows": {"queries": -1}, "full": {}}.get(variant)
    with torch.no_grad():
        _generate(model, ids[:, :8], 2)  # warm up
        before = _status("VmRSS")
        reset = _reset_peak()
        kept = 0
        if options is None:
            _generate(model, ids, new)
        else:
            with get_local.capture(**options) as cache:
                _generate(model, ids, new)
            kept = sum(v.nbytes for values in cache.values() for v in values)
        peak = _peak()
    print(json.dumps({"variant": variant, "rss_before": before, "reset": reset, "peak": peak,
                      "kept": kept}))


def memory(cfg, notes):
    commands = {
        variant: [sys.executable, "-m", "benchmarks.generation", "--child", variant,
                  "--prompt", str(cfg["gen_memory_prompt"]), "--batch", str(cfg["gen_batch"]),
                  "--new", str(cfg["gen_new"])]
        for variant, _label in MEMORY_VARIANTS}
    outputs = _env.run_children(commands, cfg["parallel_children"])
    results = {v: json.loads(stdout.strip().splitlines()[-1]) for v, stdout in outputs.items()}
    mb = 1024.0 ** 2
    base = results["none"]
    rows = []
    for variant, label in MEMORY_VARIANTS:
        r = results[variant]
        rows.append([label, "{:.0f}".format(r["peak"] / mb),
                     "{:.1f}".format((r["peak"] - r["rss_before"]) / mb),
                     "{:.2f}".format(r["kept"] / mb),
                     "{:.2f}".format((r["peak"] - r["rss_before"])
                                     / max(1, base["peak"] - base["rss_before"]))])
    full, rows_only = results["full"], results["rows"]
    notes.append("generation memory: prompt {} tokens, batch {}, {} new tokens, one fresh "
                 "process per row; full maps / new rows, peak over start: {:.2f}".format(
                     cfg["gen_memory_prompt"], cfg["gen_batch"], cfg["gen_new"],
                     (full["peak"] - full["rss_before"])
                     / max(1, rows_only["peak"] - rows_only["rss_before"])))
    return markdown(["variant", "peak RSS MB", "peak over start MB", "kept MB",
                     "x no capture (over start)"], rows), results


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, choices=[v for v, _ in MEMORY_VARIANTS])
    parser.add_argument("--prompt", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--new", type=int, required=True)
    args = parser.parse_args(argv)
    child(args.child, args.prompt, args.batch, args.new)


if __name__ == "__main__":
    main()
