"""Long context: a tiny Llama (2 layers, 4 heads) at 8192 tokens, one fresh process per variant.

Run as ``python -m benchmarks.longcontext --child VARIANT ...`` by the parent;
each child builds the model (random weights, default sdpa attention), runs
one warm-up forward without capture, resets its peak RSS (``VmHWM``), runs
the variant and prints, as JSON on its last line, its peak RSS, the RSS
before, the seconds per forward and the bytes kept.  Peak RSS is taken from
``/proc/self/status`` of the child (tracemalloc does not see torch's
allocations), so every row starts from the same state.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from . import _env
from ._timing import markdown
from .memory import _peak, _reset_peak, _status

KEY = "LlamaAttention.forward"

# variant -> (label, capture keywords or None for no capture, batches, streamed)
VARIANTS = [
    ("plain", "forward, no capture", None, 1, False),
    ("full", "full maps (B, H, T, T)", {}, 1, False),
    ("last", "queries=-1 (last row)", {"queries": -1}, 1, False),
    ("head_mean", "reduce='head_mean' (B, T, T)", {"reduce": "head_mean"}, 1, False),
    ("head_mean_last", "reduce='head_mean', queries=-1", {"reduce": "head_mean", "queries": -1},
     1, False),
    ("received", "reduce='received' (B, H, T)", {"reduce": "received"}, 1, False),
    ("stream_1", "stream=, head_mean, 1 batch", {"reduce": "head_mean"}, 1, True),
    ("stream_n", "stream=, head_mean, {n} batches", {"reduce": "head_mean"}, "n", True),
    ("memory_n", "in memory, head_mean, {n} batches", {"reduce": "head_mean"}, "n", False),
]


def child(variant, tokens, batches):
    torch = _env.setup_torch()
    import transformers

    from visualizer import get_local

    _label, kwargs, count, streamed = next(v[1:] for v in VARIANTS if v[0] == variant)
    count = batches if count == "n" else count
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=tokens)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1000, (1, tokens))
    get_local.watch_attention()
    folder = tempfile.mkdtemp(prefix="visualizer-long-") if streamed else None
    try:
        with torch.no_grad():
            model(input_ids=ids)  # warm-up, no capture
            before = _status("VmRSS")
            reset = _reset_peak()
            started = time.perf_counter()
            kept = []
            first = None  # peak after the first of several forwards, same process
            if kwargs is None:
                for _ in range(count):
                    model(input_ids=ids)
            else:
                if streamed:
                    kwargs = dict(kwargs, stream=os.path.join(folder, "run.vz"))
                with get_local.capture(**kwargs) as cache:
                    for i in range(count):
                        model(input_ids=ids)
                        if i == 0:
                            first = _peak()
                kept = cache.get(KEY, [])
                if len(kept) != 2 * count:
                    raise AssertionError("captured {} maps for {} forwards of 2 layers".format(
                        len(kept), count))
            seconds = (time.perf_counter() - started) / count
            peak = _peak()
        on_disk = sum(os.path.getsize(os.path.join(root, f))
                      for root, _, files in os.walk(folder) for f in files) if folder else 0
        shape = list(kept[0].shape) if len(kept) else None
        in_memory = 0 if streamed else sum(a.nbytes for a in kept)
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"variant": variant, "rss_before": before, "reset": reset, "peak": peak,
                      "first": first,
                      "seconds": seconds, "kept": in_memory, "disk": on_disk, "shape": shape}))


def run(cfg, notes):
    """Return (markdown table, summary dict) from one child process per variant."""
    tokens, batches = cfg["long_tokens"], cfg["long_batches"]
    commands = {
        variant: [sys.executable, "-m", "benchmarks.longcontext", "--child", variant,
                  "--tokens", str(tokens), "--batches", str(batches)]
        for variant, *_ in VARIANTS}
    # One at a time at full size (each child holds gigabytes); --quick runs them side by side.
    outputs = _env.run_children(commands, cfg["parallel_children"])
    results = {variant: json.loads(stdout.strip().splitlines()[-1])
               for variant, stdout in outputs.items()}
    mb = 1024.0 ** 2
    base = results["plain"]
    rows = []
    for variant, label, _kwargs, _count, _streamed in VARIANTS:
        r = results[variant]
        rows.append([label.format(n=batches), "{:.0f}".format(r["peak"] / mb),
                     "{:.0f}".format((r["peak"] - r["rss_before"]) / mb),
                     "{:.1f}".format(r["kept"] / mb), "{:.1f}".format(r["disk"] / mb),
                     "x".join(map(str, r["shape"])) if r["shape"] else "",
                     "{:.3f}".format(r["peak"] / base["peak"]),
                     "{:.2f}".format(r["seconds"] / base["seconds"])])
    notes.append(
        "Long context: tiny Llama (2 layers, 4 heads, hidden 64, random weights, sdpa), batch 1 "
        "at {} tokens, one fresh process per row; peak RSS is VmHWM over the measured forwards "
        "({}), after one warm-up forward without capture; 'over start' is the peak minus the "
        "RSS before them; the streaming target compares, in the same process, the peak after "
        "all batches with the peak after the first; 'kept' is what the cache holds in memory, 'disk' what the stream "
        "wrote; time is seconds per forward over the plain forward's, one run each (noisy).".format(
            tokens, "VmHWM reset before them" if all(r["reset"] for r in results.values())
            else "VmHWM since the process started"))
    text = markdown(["variant", "peak RSS MB", "peak over start MB", "kept MB", "disk MB",
                     "one value", "x plain (peak)", "x plain (time)"], rows)
    summary = {"last_vs_plain": results["last"]["peak"] / base["peak"],
               # in one process: the peak after all batches over the peak after the first
               "stream_n_vs_1": results["stream_n"]["peak"] / results["stream_n"]["first"],
               "memory_n_vs_1": results["memory_n"]["peak"] / results["memory_n"]["first"],
               "batches": batches, "tokens": tokens}
    return text, summary


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, choices=[v[0] for v in VARIANTS])
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--batches", type=int, required=True)
    args = parser.parse_args(argv)
    child(args.child, args.tokens, args.batches)


if __name__ == "__main__":
    main()
