"""Attention implementations by model family: the table of COVERAGE.md's "Implementations".

    python -m benchmarks.coverage.implementations                  # every family, every implementation
    python -m benchmarks.coverage.implementations --only llama,bert --out COVERAGE.md

Each cell builds the family's tiny model (as the architecture sweep does,
``_hf.build``), switches it to one attention implementation, and checks it
under ``get_local.watch_attention()`` + ``capture()`` against the same
independent reference as the sweep: ``output_attentions=True`` under eager
(``_compare.match_maps``: every reference map equals a captured map, rows of
padding compared by the kernels' conventions), and the outputs under capture
``torch.equal`` to the same implementation (and compilation) without capture
(``_compare.outputs_equal``).  Compiled cells use ``torch.compile(model,
backend='aot_eager')``.  ``paged`` is transformers' continuous batching
(``generate_batch``; see ``PAGED``).  Flash attention needs a GPU and the
flash-attn package, neither on the machine that writes this table: its
column says so, measured nowhere.  Each cell runs in its own forked child
(``_sandbox``).  The table replaces the part of ``--out`` between the
markers ``MARK_START`` and ``MARK_END`` (appended once if absent), so the
architecture sweep and this one write one file.
"""
import argparse
import os
import sys
import time
import warnings

from . import _sandbox
from ._compare import captured_maps, match_maps, one_line, outputs_equal

FAMILIES = ["bert", "gpt2", "llama", "mistral", "qwen2", "t5", "vit"]
IMPLEMENTATIONS = ["eager", "sdpa", "flex_attention", "compiled sdpa",
                   "compiled flex_attention", "paged"]
FLASH = "flash_attention_2"
MARK_START = "<!-- implementations: python -m benchmarks.coverage.implementations -->"
MARK_END = "<!-- /implementations -->"


def _log(message):
    print(message, file=sys.stderr, flush=True)


def check(item):
    """Check one ``(family, implementation)``; returns ``{'status', 'reason'}``."""
    family, implementation = item
    import torch

    from visualizer import get_local

    from . import _hf

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    compiled = implementation.startswith("compiled ")
    name = implementation.split(" ", 1)[1] if compiled else implementation
    model, eager, config = _hf.build(family)
    if name == "paged":
        return _paged(model, config)
    inputs = _hf.make_inputs(model, config)[0]
    if name == "flex_attention" and not getattr(model, "_supports_flex_attn", False):
        return {"status": "not supported", "reason": "transformers has no flex attention for "
                + type(model).__name__}
    try:
        model.set_attn_implementation(name)
    except Exception as error:
        return {"status": "not supported", "reason": one_line(error)}
    reference = [t.float().numpy() for t in _attentions(_hf._forward(eager, inputs,
                                                                     output_attentions=True))]
    run = torch.compile(model, backend="aot_eager") if compiled else model
    try:
        plain = _hf._forward(run, inputs)
    except Exception as error:  # the library's own path: nothing to capture from
        return {"status": "not supported", "reason": "{} fails without capture: {}".format(
            implementation, one_line(error))}
    try:
        with get_local.capture() as cache:
            captured = _hf._forward(run, inputs)
    except Exception as error:
        return {"status": "missed", "reason": "raised under capture: " + one_line(error)}
    unmatched, why, _ = match_maps(reference, captured_maps(cache))
    changed = outputs_equal(plain, captured)
    if why or changed:
        return {"status": "missed", "reason": "; ".join(r for r in (why, changed) if r)}
    return {"status": "covered", "reason": "{} maps".format(len(reference))}


def _attentions(out):
    maps = []
    for name in ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions"):
        maps += [t for t in (getattr(out, name, None) or ()) if t is not None and t.dim() >= 3]
    return maps


PROMPTS = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16, 17]]  # three lengths
PAGED_NEW_TOKENS = 3


def _paged(model, config):
    """Continuous batching (``generate_batch``): each request's maps against it alone, eager."""
    import copy

    import torch
    import transformers

    from visualizer import get_local
    from visualizer.generation import requests, steps_by_module, stitch

    from . import _hf

    if not hasattr(transformers.GenerationMixin, "generate_batch"):
        return {"status": "not supported", "reason": "this transformers has no generate_batch"}
    causal = transformers.AutoModelForCausalLM._model_mapping.get(type(config), None)
    if causal is None:
        return {"status": "not supported",
                "reason": "no causal language model (continuous batching generates)"}
    torch.manual_seed(_hf.SEED)
    lm = causal._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    eager = causal._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(lm.state_dict())
    options = transformers.GenerationConfig(max_new_tokens=PAGED_NEW_TOKENS, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)
    # A small cache: it is sized from free memory otherwise, past the sandbox's cap.
    paging = {}
    if hasattr(transformers.generation, "ContinuousBatchingConfig"):
        paging["continuous_batching_config"] = transformers.generation.ContinuousBatchingConfig(
            num_blocks=16, max_batch_tokens=64)
    try:
        plain = lm.generate_batch(PROMPTS, generation_config=options, **paging)
    except Exception as error:
        return {"status": "not supported", "reason": "generate_batch: " + one_line(error)}
    failed = [str(r.error) for r in plain.values() if getattr(r, "error", None) is not None]
    if failed:
        return {"status": "not supported", "reason": "generate_batch: the requests failed "
                "without capture: " + one_line(failed[0])}
    with get_local.capture() as cache:
        batched = lm.generate_batch(PROMPTS, generation_config=options, **paging)
    tokens = {r: list(v.generated_tokens) for r, v in batched.items()}
    if tokens != {r: list(v.generated_tokens) for r, v in plain.items()}:
        return {"status": "missed", "reason": "capture changed the generated tokens"}
    if sorted(requests(cache)) != sorted(batched):
        return {"status": "missed", "reason": "maps of requests {} for requests {}".format(
            sorted(requests(cache)), sorted(batched))}
    for request, prompt in zip(batched, PROMPTS):
        with torch.no_grad():
            alone = eager.generate(torch.tensor([prompt]), max_new_tokens=PAGED_NEW_TOKENS,
                                   do_sample=False, output_attentions=True,
                                   return_dict_in_generate=True, pad_token_id=0)
        layers = len(alone.attentions[0])
        reference = [stitch([step[layer] for step in alone.attentions])
                     for layer in range(layers)]
        captured = [stitch(steps) for steps in
                    steps_by_module(lm, cache, request=request).values()]
        unmatched, why, _ = match_maps(reference, captured)
        if why:
            return {"status": "missed", "reason": "request {}: {}".format(request, why)}
    return {"status": "covered", "reason": "{} requests, {} layers each, stitched".format(
        len(PROMPTS), layers)}


def sweep(families, implementations, jobs=1, timeout=300.0):
    """Check every cell in a forked child each; return ``{(family, implementation): result}``."""
    import torch  # noqa: F401 - imported once, shared by the children

    import transformers

    from visualizer import get_local

    transformers.logging.set_verbosity_error()
    get_local.watch_attention()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    items = [(f, i) for f in families for i in implementations]
    results = {}

    def done(item, result):
        results[item] = result
        _log("{:10} {:26} {}: {}".format(item[0], item[1], result.get("status"),
                                        result.get("reason", "")[:120]))

    outcome = _sandbox.run_all(check, items, jobs=jobs, memory_gb=8.0, seconds=timeout,
                               quiet=True)
    for item, result in zip(items, outcome):
        done(item, result)
    return results


_MARKS = {"covered": "✓", "missed": "✗", "not supported": "–", "not measured": "·",
          "not built": "✗"}


def markdown(results, families, implementations, seconds):
    """The table, between the markers, with a legend and the reasons of every cell not covered."""
    import torch
    import transformers

    lines = [MARK_START, "", "## Attention implementations", "",
             "Each cell: the family's tiny model switched to that implementation, checked under "
             "capture against `output_attentions=True` under eager (every map equal, 1e-5) with "
             "the outputs `torch.equal` to the same implementation without capture; compiled: "
             "`torch.compile(model, backend='aot_eager')`. ✓ covered, ✗ missed, – not available "
             "(the library has no such implementation for the family, or it fails without "
             "capture: the reason is below), · not measured here. transformers {}, "
             "torch {}, {} (`python -m benchmarks.coverage.implementations`, {:.0f} s).".format(
                 transformers.__version__, torch.__version__.split("+")[0],
                 time.strftime("%Y-%m-%d"), seconds), ""]
    columns = list(implementations) + [FLASH]
    lines.append("| family | " + " | ".join(columns) + " |")
    lines.append("| --- |" + " :---: |" * len(columns))
    notes = []
    for family in families:
        cells = []
        for implementation in implementations:
            result = results[(family, implementation)]
            status = result.get("status", "missed")
            cells.append(_MARKS.get(status, "✗"))
            if status != "covered":
                notes.append("- {} / {}: {}: {}".format(family, implementation, status,
                                                       result.get("reason", "")))
        cells.append(_MARKS["not measured"])
        lines.append("| {} | {} |".format(family, " | ".join(cells)))
    lines += ["", "{}: not measured (needs a CUDA GPU and the flash-attn package; see README, "
              "\"flash-attn\"). Where a model asks for it here, transformers refuses when it is "
              "built, and visualizer names any flash kernel that runs while capturing.".format(FLASH)]
    if notes:
        lines += ["", "Cells not covered:", ""] + notes
    lines += ["", MARK_END, ""]
    return "\n".join(lines)


def marked(path):
    """``(before, table, after)``: the file at ``path`` around its marked table ('' where none)."""
    text = ""
    if path and os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if MARK_START not in text or MARK_END not in text:
        return text, "", ""
    start, end = text.index(MARK_START), text.index(MARK_END) + len(MARK_END)
    return text[:start], text[start:end], text[end:]


def write(table, out):
    """Put ``table`` in place of the marked part of ``out`` (appended if there is none)."""
    before, old, after = marked(out)
    if old:
        text = before + table + after.lstrip("\n")
    else:
        text = before.rstrip("\n") + ("\n\n" if before else "") + table
    if out:
        with open(out, "w") as f:
            f.write(text)
        _log("wrote " + out)
    else:
        sys.stdout.write(table)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coverage.implementations",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated families (default: {})".format(
        ",".join(FAMILIES)))
    parser.add_argument("--implementations", help="comma-separated, of: {}".format(
        ", ".join(IMPLEMENTATIONS)))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", default=None, help="the file to write the table into")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.only.split(",")] if args.only else FAMILIES
    implementations = ([i.strip() for i in args.implementations.split(",")]
                       if args.implementations else IMPLEMENTATIONS)
    unknown = [i for i in implementations if i not in IMPLEMENTATIONS]
    if unknown or not families or args.jobs < 1:
        parser.error("unknown implementation(s) {}; known: {}".format(unknown, IMPLEMENTATIONS)
                     if unknown else "nothing to check")
    start = time.time()
    results = sweep(families, implementations, args.jobs, args.timeout)
    write(markdown(results, families, implementations, time.time() - start), args.out)
    return 0  # a miss is a result (in the table), not a failure of the sweep


if __name__ == "__main__":
    sys.exit(main())
