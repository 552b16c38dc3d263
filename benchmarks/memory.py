"""Peak resident memory of one ViT forward with and without capture, one fresh process each.

Run as ``python -m benchmarks.memory --child VARIANT ...`` by the parent; each
child builds the model, runs one batch under ``torch.no_grad()`` and prints
its peak RSS (``VmHWM``, reset just before the batch) as JSON on its last line.
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


def _status(field):
    """A field of /proc/self/status in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak():
    """Make the peak RSS (VmHWM) the current RSS; True if the kernel allowed it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak():
    # Not ru_maxrss: a child started by a process holding gigabytes reports at
    # least the parent's RSS there (Linux records the RSS of the mm that exec
    # replaces, and subprocess uses vfork), so every child looked alike.
    peak = _status("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def child(variant, model_name, batch, vit_kwargs):
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
        before = _status("VmRSS")
        reset = _reset_peak()
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
        peak = _peak()
    print(json.dumps({"variant": variant, "rss_before": before, "reset": reset,
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
    base = results["eager"]
    rows = []
    for variant, label in VARIANTS:
        r = results[variant]
        rows.append([label, "{:.0f}".format(r["peak"] / mb),
                     "{:.0f}".format((r["peak"] - r["rss_before"]) / mb),
                     "{:.1f}".format(r["kept"] / mb),
                     "x".join(map(str, r["shape"])) if r["shape"] else "",
                     "{:.2f}".format(r["peak"] / base["peak"]),
                     "{:.2f}".format((r["peak"] - r["rss_before"])
                                     / (base["peak"] - base["rss_before"]))])
    notes.append(
        "Memory: {} at batch {}, one fresh process per row; peak RSS is VmHWM after one "
        "batch ({}); 'over start' is the peak minus the RSS just before the batch (model built, "
        "one warm-up image run); 'kept' is the size of the stored maps (all layers).".format(
            cfg["memory_model"], cfg["memory_batch"],
            "VmHWM reset before the batch" if all(r["reset"] for r in results.values())
            else "VmHWM since the process started"))
    text = markdown(["variant", "peak RSS MB", "peak over start MB", "kept MB",
                     "one map", "x eager (peak)", "x eager (over start)"], rows)
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
