"""Run every benchmark side by side and print the tables of BENCHMARKS.md.

    python -m benchmarks            # full sizes, about 18 minutes on 2 cores
    python -m benchmarks --quick    # tiny sizes, every code path, under a minute

Exits non-zero if any benchmark fails, including the correctness gate that
checks every capture method returns the same maps before anything is timed.
"""
import argparse
import os
import sys
import time
import traceback

from . import _env

FULL = {
    "batch": 8,
    "vit_kwargs": {},
    "warmup": 1,
    "vit_s_rounds": 30,
    "vit_b_rounds": 8,
    "bert_tokens": 128,
    "bert_rounds": 15,
    "percall_number": 200000,
    "percall_rounds": 15,
    "decorate_n": 200,
    "decorate_rounds": 7,
    "memory_model": "vit_base_patch16_224",
    "memory_batch": 32,
    "import_rounds": 5,
    "parallel_children": 1,
    "compiled_rounds": 30,
    "compiled_warmup": 2,
    "compile_backend": "inductor",
    "long_tokens": 8192,
    "long_batches": 6,
    "gen_batch": 1,
    "gen_prompt": 64,
    "gen_new": 64,
    "gen_rounds": 10,
    "gen_memory_prompt": 2048,
    "gpt2_layers": 12,
    "gpt2_width": 768,
    "gpt2_prompt": 128,
    "gpt2_new": 32,
    "gpt2_rounds": 8,
    "seam_calls": 3000,
    "seam_rounds": 7,
    "relevance_batch": 8,
    "relevance_rounds": 15,
    "digits_seconds": 120.0,  # 20 epochs take about 20 s on a quiet core
    "digits_epochs": 20,
    "faithfulness_images": 1000,  # all the held-out digits (360)
    "faithfulness_figure": "benchmarks/figures/faithfulness.png",
}

QUICK = dict(FULL, batch=2, vit_kwargs={"depth": 2, "img_size": 32}, warmup=1,
             vit_s_rounds=2, vit_b_rounds=2, bert_tokens=16, bert_rounds=2,
             percall_number=2000, percall_rounds=2, decorate_n=4, decorate_rounds=1,
             memory_batch=2, import_rounds=1, parallel_children=4, compiled_rounds=2,
             compiled_warmup=1, compile_backend="eager", long_tokens=512, long_batches=3,
             gen_prompt=8, gen_new=6, gen_rounds=2, gen_memory_prompt=32,
             gpt2_layers=2, gpt2_width=96, gpt2_prompt=8, gpt2_new=4, gpt2_rounds=2,
             seam_calls=20, seam_rounds=2,
             relevance_batch=2, relevance_rounds=2, digits_seconds=3.0, digits_epochs=1,
             faithfulness_images=40, faithfulness_figure=None)

# The same code as vit_s at tiny sizes; --quick leaves it out to stay fast.
QUICK_SKIPS = {"vit_b"}

SECTIONS = ["percall", "decorate", "vit_s", "vit_b", "bert", "compiled", "memory", "imports",
            "longcontext", "generation", "relevance", "faithfulness"]


def _log(message):
    print(message, file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and 1-2 rounds: checks that everything runs (for CI)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="run only these sections")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of the end-to-end sections (ViT, BERT, compiled, "
                             "generation) instead of the size's default: fewer on a busy machine")
    parser.add_argument("--anycapture-dir", default=_env.ANYCAPTURE_DIR,
                        help="where anycapture was installed with pip --target "
                             "(default: %(default)s)")
    parser.add_argument("--require-anycapture", action="store_true",
                        help="fail instead of skipping the anycapture rows when it is missing")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 2:
            parser.error("--rounds must be at least 2 (a ratio needs a spread)")
        cfg = dict(cfg, **{key: args.rounds for key in (
            "vit_s_rounds", "vit_b_rounds", "bert_rounds", "compiled_rounds", "gen_rounds",
            "relevance_rounds")})
    # Children (memory, imports) run from the repository root with -m.
    os.chdir(_env.REPO)
    if _env.REPO not in sys.path:
        sys.path.insert(0, _env.REPO)

    failed = []
    notes = []
    summaries = {}
    started = time.perf_counter()

    def section(key, title, function, *fargs):
        if key not in args.only or (args.quick and key in QUICK_SKIPS):
            return
        _log("[{:6.0f}s] {} ...".format(time.perf_counter() - started, title))
        try:
            text, summary = function(*fargs)
        except Exception:
            failed.append(key)
            text, summary = "FAILED:\n\n```\n" + traceback.format_exc() + "```", None
            _log(traceback.format_exc())
        print("### " + title + "\n\n" + text + "\n", flush=True)
        summaries[key] = summary

    _env.setup_torch()
    header = _env.describe_machine(args.anycapture_dir)
    anycapture, why_not = _env.load_anycapture(args.anycapture_dir)
    if anycapture is None:
        message = "anycapture rows skipped: " + why_not
        header.append(message)
        _log(message)
        if args.require_anycapture:
            failed.append("anycapture")

    from . import bert, compiled, generation, imports, longcontext, memory, percall, relevance, vit

    size = "quick (tiny sizes, numbers meaningless)" if args.quick else "full"
    header.append("sizes: {}; batch {}".format(size, cfg["batch"]))
    print("## visualizer benchmarks\n")
    for line in header:
        print("- " + line)
    print(flush=True)
    section("percall", "Per-call overhead (trivial function vs module call)",
            percall.per_call, cfg, anycapture, notes)
    section("decorate", "Decoration cost per function", percall.decoration, cfg, anycapture,
            notes)
    section("vit_s", "ViT-S/16, CPU, batch {}, {} rounds".format(cfg["batch"], cfg["vit_s_rounds"]),
            vit.run, dict(cfg, vit_rounds=cfg["vit_s_rounds"]), "vit_small_patch16_224",
            anycapture, notes)
    section("vit_b", "ViT-B/16, CPU, batch {}, {} rounds".format(cfg["batch"], cfg["vit_b_rounds"]),
            vit.run, dict(cfg, vit_rounds=cfg["vit_b_rounds"]), "vit_base_patch16_224",
            anycapture, notes)
    section("bert", "BERT (all-MiniLM-L6-v2), CPU, batch {}, {} tokens, {} rounds".format(
        cfg["batch"], cfg["bert_tokens"], cfg["bert_rounds"]), bert.run, cfg, anycapture, notes)
    section("compiled", "ViT-S/16 under torch.compile ({}, fullgraph=True), CPU, batch {}, {} "
            "rounds".format(cfg["compile_backend"], cfg["batch"], cfg["compiled_rounds"]),
            compiled.run, cfg, notes)
    section("memory", "Peak memory, {} at batch {}".format(
        "ViT-B/16" if not args.quick else "tiny ViT", cfg["memory_batch"]),
        memory.run, cfg, notes)
    section("imports", "Import time of timm, presets on vs off", imports.run, cfg, notes)
    section("longcontext", "Long context: tiny Llama at {} tokens, peak memory".format(
        cfg["long_tokens"]), longcontext.run, cfg, notes)
    section("generation", "generate() of {} new tokens, tiny random Llama (GQA), CPU".format(
        cfg["gen_new"]), generation.run, cfg, notes)
    section("relevance", "Relevance: forward + backward with capture(grad=True), {} rounds".format(
        cfg["relevance_rounds"]), relevance.overhead, cfg, notes)
    section("faithfulness", "Relevance: the perturbation test on the digits ViT",
            relevance.faithfulness, cfg, notes)

    targets = _targets(summaries, cfg)
    if targets:
        print("### Targets\n\n" + targets + "\n")
    if notes:
        print("Notes:\n")
        for note in notes:
            print("- " + note)
        print()
    print("total time: {:.0f} s; load average at the end: {}".format(
        time.perf_counter() - started, _env.load_average()))
    if failed:
        print("FAILED sections: " + ", ".join(failed))
        return 1
    return 0


def _verdict(median, ci, target):
    """Compare a ratio's median and ~95% interval with an upper bound."""
    lo, hi = ci
    if hi <= target:
        return "met"
    if median <= target:
        return "met by the median; within noise"
    if lo <= target:
        return "missed by the median; within noise"
    return "MISSED"


def _ratio(value):
    median, (lo, hi) = value
    return "{:.3f} (95% CI {:.3f}-{:.3f})".format(median, lo, hi)


def _targets(s, cfg):
    """The issue's targets against this run's numbers, as a markdown table."""
    from . import generation
    from ._timing import markdown

    rows = []
    dec = s.get("decorate")
    if dec:
        same = all(v["same"] for v in dec.values() if isinstance(v, dict))
        rows.append(["inactive: the function object itself (zero)",
                     "decorator returns f, f.__code__ unchanged: {}".format(
                         "yes" if same else "NO"), "met" if same else "MISSED"])
    pc = s.get("percall")
    if pc:
        r = pc["int"]
        rows.append(["per-call capture <= 0.1 x forward hook",
                     "{:.0f} ns vs {:.0f} ns = {:.3f}".format(r["capture_ns"], r["hook_ns"],
                                                             r["ratio"]),
                     "met" if r["ratio"] <= 0.1 else "MISSED"])
        r = pc["tensor"]
        rows.append(["same, both storing a NumPy copy of a small tensor (no target)",
                     "{:.0f} ns vs {:.0f} ns = {:.3f}".format(r["capture_ns"], r["hook_ns"],
                                                             r["ratio"]), ""])
    vs = s.get("vit_s")
    if vs:
        rows.append(["ViT-S/16 capture all {} layers <= 1.03 x eager".format(vs["depth"]),
                     _ratio(vs["gl_vs_eager"]), _verdict(*vs["gl_vs_eager"], target=1.03)])
        rows.append(["ViT-S/16 capture never slower than hooks (NumPy copies both)",
                     _ratio(vs["gl_vs_hooks"]) + " x hooks",
                     _verdict(*vs["gl_vs_hooks"], target=1.0)])
        if "seam_off" in vs:
            rows.append(["off: F.scaled_dot_product_attention is torch's own (zero cost)",
                         "yes" if vs["seam_off"] else "NO", "met" if vs["seam_off"] else "MISSED"])
        if "gl_vs_ae_hook" in vs:
            rows.append(["ViT-S/16 seam capture no slower than AttentionExtract (hook)",
                         _ratio(vs["gl_vs_ae_hook"]) + " x AttentionExtract",
                         _verdict(*vs["gl_vs_ae_hook"], target=1.0)])
            rows.append(["ViT-S/16 seam capture x AttentionExtract (fx) (no target)",
                         _ratio(vs["gl_vs_ae_fx"]), ""])
            rows.append(["ViT-S/16 seam capture x the fused forward it keeps (no target)",
                         _ratio(vs["gl_vs_fused"]), ""])
            rows.append(["ViT-S/16 seam capture x eager-forced capture (no target)",
                         _ratio(vs["gl_vs_forced"]), ""])
    for key, label in (("vit_b", "ViT-B/16"), ("bert", "BERT")):
        v = s.get(key)
        if v:
            rows.append(["{} capture, x eager (no target)".format(label),
                         _ratio(v["gl_vs_eager"]), ""])
            rows.append(["{} capture, x hooks (no target)".format(label),
                         _ratio(v["gl_vs_hooks"]), ""])
            if "gl_vs_forced" in v:
                rows.append(["{} seam capture x eager-path capture (no target)".format(label),
                             _ratio(v["gl_vs_forced"]), ""])
    c = s.get("compiled")
    if c:
        rows.append(["ViT-S/16 compiled, kernel seam capture x compiled fused (no target)",
                     _ratio(c["seam_vs_fused"]), ""])
        rows.append(["ViT-S/16 compiled, eager-path capture x compiled fused (no target)",
                     _ratio(c["gl_vs_fused"]), ""])
        rows.append(["ViT-S/16 compiled, capture x compiled fused_attn=False (no target)",
                     _ratio(c["gl_vs_unfused"]), ""])
    lc = s.get("longcontext")
    if lc:
        rows.append(["{} tokens: queries=-1 peak <= 1.05 x the forward without capture".format(
            lc["tokens"]), "{:.3f}".format(lc["last_vs_plain"]),
            "met" if lc["last_vs_plain"] <= 1.05 else "MISSED"])
        rows.append(["streaming: peak after {} batches <= 1.05 x after the first (flat)".format(
            lc["batches"]), "{:.3f} (in memory: {:.2f})".format(
                lc["stream_n_vs_1"], lc["memory_n_vs_1"]),
            "met" if lc["stream_n_vs_1"] <= 1.05 else "MISSED"])
    g = s.get("generation")
    if g and g.get("seam"):
        rows.append(["generate (tiny Llama), capture of the new rows <= 1.25 x no capture",
                     _ratio(g["rows_vs_sdpa"]), _verdict(*g["rows_vs_sdpa"], target=1.25)])
        if g.get("gpt2"):
            rows.append(["generate (GPT-2 small size), capture of the new rows <= 1.10 x "
                         "no capture", _ratio(g["gpt2"]["rows_vs_sdpa"]),
                         _verdict(*g["gpt2"]["rows_vs_sdpa"], target=1.10)])
        rows.append(["generate, capture of full maps, x no capture (no target)",
                     _ratio(g["full_vs_sdpa"]), ""])
        for label, call in sorted(g.get("per_call", {}).items()):
            rows.append(["per kernel call of a decoding step ({}): capturing <= kernel + "
                         "probabilities + 10 µs".format(label),
                         "{:.1f} µs vs {:.1f} + 10 µs (bookkeeping {:.1f} µs)".format(
                             call[generation.CAPTURING], call[generation.ARITHMETIC],
                             call["bookkeeping"]),
                         "met" if call["bookkeeping"] <= 10 else "MISSED"])
    rel = s.get("relevance")
    if rel:
        for label, v in rel.items():
            rows.append(["{} forward + backward, capture(grad=True) x none (no target)".format(
                label), _ratio(v["grad_vs_plain"]), ""])
    f = s.get("faithfulness")
    if f:
        ours = f["relevance"]["positive"]
        faster = ours < f["random"]["positive"] and \
            ours < f["raw attention (last layer CLS)"]["positive"]
        rows.append(["digits ViT: relevance order drops the class faster than random and raw "
                     "attention (positive AUC)",
                     "{:.3f} vs {:.3f} random, {:.3f} raw attention".format(
                         ours, f["random"]["positive"],
                         f["raw attention (last layer CLS)"]["positive"]),
                     "met" if faster else "MISSED"])
    if not rows:
        return ""
    return markdown(["target", "this run (median of per-round ratios)", "verdict"], rows)


if __name__ == "__main__":
    sys.exit(main())
