"""Peak resident memory of one ViT forward with and without capture, one fresh process each.

Run as ``python -m benchmarks.memory --child VARIANT ...`` by the parent; each
child builds the model, runs one batch under ``torch.no_grad()`` and prints
its peak RSS (``ru_maxrss``) as JSON on its last line.
"""
import argparse
import json
import sys

from . import _env
from ._timing import markdown

VARIANTS = [
    ("eager", "eager forward, no capture"),
    ("fused", "fused forward, no capture"),
    ("hooks", "forward hooks, NumPy copies"),
    ("default", "get_local, NumPy copies (default)"),
    ("cls", "get_local, transform=lambda a: a[:, :, 0] (CLS row)"),
    ("headmean", "get_local, transform=lambda a: a.mean(1) (head mean)"),
]


def _rss_now():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(variant, model_name, batch, vit_kwargs):
    import resource

    torch = _env.setup_torch()
    import timm
    from timm.layers.attention import Attention
    from visualizer import get_local

    _env.watch_timm(get_local)
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, **vit_kwargs).eval()
    if variant in ("eager", "hooks"):
        for m in model.modules():
            if isinstance(m, Attention):
                m.fused_attn = False
    size = vit_kwargs.get("img_size", 224)
    x = torch.randn(batch, 3, size, size)
    store = []
    if variant == "hooks":
        for m in model.modules():
            if isinstance(m, Attention):
                m.attn_drop.register_forward_hook(
                    lambda mod, args, out: store.append(out.detach().cpu().numpy().copy()))
    transforms = {"default": None, "cls": lambda a: a[:, :, 0], "headmean": lambda a: a.mean(1)}
    with torch.no_grad():
        model(x[:1])  # warm up kernels and allocator with a batch of one
        store.clear()
        before = _rss_now()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if variant in transforms:
            with get_local.capture(transform=transforms[variant]) as cache:
                model(x)
            kept = cache.get(_env.TIMM_KEY, [])
            if len(kept) != len(model.blocks):
                raise AssertionError("captured {} maps for {} blocks".format(
                    len(kept), len(model.blocks)))
        else:
            model(x)
            kept = store
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": variant, "rss_before": before, "peak_before": peak_before,
                      "peak": peak, "kept": sum(a.nbytes for a in kept),
                      "shape": list(kept[0].shape) if kept else None}))


def run(cfg, notes):
    """Return (markdown table, summary dict) from one child process per variant."""
    commands = {
        variant: [sys.executable, "-m", "benchmarks.memory", "--child", variant,
                  "--model", cfg["memory_model"], "--batch", str(cfg["memory_batch"]),
                  "--vit-kwargs", json.dumps(cfg["vit_kwargs"])]
        for variant, _label in VARIANTS}
    outputs = _env.run_children(commands, cfg["parallel_children"])
    results = {variant: json.loads(stdout.strip().splitlines()[-1])
               for variant, stdout in outputs.items()}
    mb = 1024.0 ** 2
    base = results["eager"]["peak"]
    rows = []
    for variant, label in VARIANTS:
        r = results[variant]
        rows.append([label, "{:.0f}".format(r["peak"] / mb),
                     "{:.0f}".format((r["peak"] - r["rss_before"]) / mb),
                     "{:.1f}".format(r["kept"] / mb),
                     "x".join(map(str, r["shape"])) if r["shape"] else "",
                     "{:.2f}".format(r["peak"] / base)])
    notes.append(
        "Memory: {} at batch {}, one fresh process per row; peak RSS is ru_maxrss after one "
        "batch; 'over start' is the peak minus the RSS just before the batch (model built, one "
        "warm-up image run); 'kept' is the size of the stored maps (all layers).".format(
            cfg["memory_model"], cfg["memory_batch"]))
    text = markdown(["variant", "peak RSS MB", "peak over start MB", "kept MB",
                     "one map", "x eager peak"], rows)
    return text, results


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, choices=[v for v, _ in VARIANTS])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--vit-kwargs", default="{}")
    args = parser.parse_args(argv)
    child(args.child, args.model, args.batch, json.loads(args.vit_kwargs))


if __name__ == "__main__":
    main()
