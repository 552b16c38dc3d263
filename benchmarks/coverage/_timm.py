"""timm: every model with attention, checked against its probabilities with the fused path off.

For one model name :func:`check`

1. builds the model (``pretrained=False``, ``img_size=64`` and ``depth=2``
   where the model accepts them, else its default input size and depth) with
   a fixed seed;
2. reference: the same model with every module's ``fused_attn`` set to
   False, run under ``_reference.SoftmaxRecorder`` (every softmax over the
   last dimension, and the probabilities of any SDPA call that remains,
   recomputed by hand); the flags are put back before the next runs;
3. runs the default (fused) model without capture, then under
   ``watch_attention()`` and ``capture()``, and compares (see ``_compare``).

timm has no layout of its own for maps (no ``output_attentions``): the
reference holds each as torch computed it, and a 3-D one is expected in the
layout every attention map has, ``(batch, heads, queries, keys)``
(:func:`in_layout`).

A model name is swept when its module (or a timm.models module it imports
from) mentions softmax, SDPA, ``fused_attn`` or an ``Attention`` class; a
model none of whose modules (built on the meta device) comes from a source
file computing a softmax or calling SDPA is "no attention" at once, and so is
a model that then computes no softmax over its last axis at all (factorized,
linear attention: out of scope).
"""
import importlib
import inspect
import re

from ._compare import captured_maps, match_maps, one_line, outputs_equal

__all__ = ["model_names", "check", "in_layout", "versions", "IMG_SIZE"]

IMG_SIZE = 64
DEPTH = 2  # where the model takes ``depth`` (ViT and kin): giant widths stay, 40 blocks do not
BATCH = 2
SEED = 0
_ATTENTION = re.compile(r"softmax|scaled_dot_product_attention|fused_attn|\bAttention\w*\b")
_IMPORT = re.compile(r"from (?:timm\.models)?\.(\w+) import")


def versions():
    """``{'timm': ..., 'torch': ...}``."""
    import timm
    import torch

    return {"timm": timm.__version__, "torch": torch.__version__}


def model_names():
    """Every ``timm.list_models()`` name whose module computes attention (see the module docstring)."""
    import timm
    from timm.models import _registry

    names = timm.list_models()
    modules = sorted({_registry._model_to_module[n] for n in names})
    sources = {}
    for module in modules:
        try:
            sources[module] = inspect.getsource(importlib.import_module("timm.models." + module))
        except (ImportError, OSError, TypeError):
            sources[module] = ""
    attention = {m for m in modules if _ATTENTION.search(sources[m])}
    changed = True
    while changed:  # deit builds VisionTransformer: follow imports between timm.models modules
        changed = False
        for module in modules:
            if module not in attention and any(i in attention for i in _IMPORT.findall(sources[module])):
                attention.add(module)
                changed = True
    return [n for n in names if _registry._model_to_module[n] in attention]


def _build(name):
    """``(model, input)``: the smallest build and input the model takes of ours, else its defaults."""
    import timm
    import torch

    errors = []
    for kwargs in ({"img_size": IMG_SIZE, "depth": DEPTH}, {"img_size": IMG_SIZE}, {"depth": DEPTH}, {}):
        torch.manual_seed(SEED)
        try:
            model = timm.create_model(name, pretrained=False, **kwargs).eval()
        except Exception as error:
            errors.append(error)
            continue
        cfg = getattr(model, "pretrained_cfg", None) or {}
        channels, height, width = cfg.get("input_size", (3, 224, 224))
        for size in dict.fromkeys([(channels, IMG_SIZE, IMG_SIZE), (channels, height, width)]):
            x = torch.randn((BATCH,) + size, generator=torch.Generator().manual_seed(SEED))
            try:
                with torch.no_grad():
                    model(x)
            except Exception as error:
                errors.append(error)
                continue
            model._coverage_kwargs = kwargs
            return model, x
    raise errors[-1]


_COMPUTES = re.compile(r"softmax\(|scaled_dot_product_attention|fused_attn")


def _without_attention(name):
    """True when no module of the model (built on the meta device: no memory, no init work) comes
    from a source file that computes a softmax or calls SDPA; False when unsure."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:
        return False
    files = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Softmax):
            return False
        try:
            files.add(inspect.getsourcefile(type(module)))
        except TypeError:
            return False
    for path in files:
        if path is None or "/torch/" in path:
            continue
        with open(path) as f:
            if _COMPUTES.search(f.read()):
                return False
    return True


def _set_fused(model, value):
    """Set every module's ``fused_attn``; return the previous values to put back."""
    before = []
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            before.append((module, module.fused_attn))
            module.fused_attn = value
    return before


def in_layout(maps, layouts):
    """The reference maps in the layout ``(batch, heads, queries, keys)``.

    A 3-D map computed by a method whose module has ``num_heads`` H and whose
    local ``B`` holds the batch (windows included: Swin-like blocks attend
    within ``B = batch x windows``): ``(B, H, N, M)`` where its first axis is
    ``B x H`` (heads merged into the batch axis: BoTNet, SAM ViT), ``(B, 1, N,
    M)`` where it is ``B`` (one head of a loop over heads: EfficientViT).  Any
    other map stays as torch computed it.
    """
    laid_out = []
    for array, (heads, batch) in zip(maps, layouts):
        if array.ndim == 3 and heads and batch:
            if array.shape[0] == batch * heads:
                array = array.reshape((batch, heads) + array.shape[1:])
            elif array.shape[0] == batch:
                array = array.reshape((batch, 1) + array.shape[1:])
        laid_out.append(array)
    return laid_out


def _forward(model, x):
    import torch

    torch.manual_seed(SEED)
    with torch.no_grad():
        return model(x)


def check(name):
    """Check one timm model; returns a dict with ``status`` and ``reason``."""
    import torch

    from visualizer import get_local

    from ._reference import SoftmaxRecorder

    torch.set_num_threads(1)
    if _without_attention(name):
        return {"status": "no attention", "reason": "no module computes a softmax or calls SDPA"}
    try:
        model, x = _build(name)
    except Exception as error:
        return {"status": "not built", "reason": one_line(error)}
    result = {"model": type(model).__name__, "inputs": "x{}".format(tuple(x.shape)),
              "depth": getattr(model, "_coverage_kwargs", {}).get("depth")}
    before = _set_fused(model, False)
    recorder = SoftmaxRecorder()
    try:
        with recorder:
            _forward(model, x)
    except Exception as error:
        return dict(result, status="not built", reason="unfused forward failed: " + one_line(error))
    finally:
        for module, value in before:
            module.fused_attn = value
    reference = in_layout([m.numpy() for m in recorder.maps], recorder.layouts)
    result["fused_modules"] = len(before)
    if not reference:
        return dict(result, status="no attention", reason="computes no softmax or SDPA")
    result["maps"] = len(reference)
    kinds = sorted(set(recorder.kinds))
    if kinds != ["softmax"]:
        result["reference"] = "+".join(kinds)
    try:
        plain = _forward(model, x)
    except Exception as error:
        return dict(result, status="missed", reason="default forward failed: " + one_line(error))
    try:
        with get_local.capture() as cache:
            captured = _forward(model, x)
    except Exception as error:
        return dict(result, status="missed", reason="forward under capture raised " + one_line(error))
    maps = captured_maps(cache)
    result["captured"] = len(maps)
    unmatched, why, note = match_maps(reference, maps, recorder.owners)
    if unmatched and before:
        # The unfused copy's later layers see activations rounded differently
        # (eager attn @ v instead of the kernel), and differential attention
        # computes one softmax where the fused path makes two kernel calls.
        # Second reference: the default (fused) forward itself, each kernel
        # call's probabilities recomputed by hand from its own q and k.
        fused = SoftmaxRecorder()
        with fused:
            _forward(model, x)
        again = match_maps(in_layout([m.numpy() for m in fused.maps], fused.layouts), maps) \
            if fused.maps else None
        if again is not None and not again[0]:
            note = "; ".join(n for n in (
                "reference: the default forward's kernel calls, recomputed from their q and k "
                "({} maps; the unfused copy's {})".format(len(fused.maps), why.split(";")[0]),
                again[2]) if n)
            result["maps"], unmatched, why = len(fused.maps), 0, ""
    changed = outputs_equal(plain, captured)
    result["unmatched"] = unmatched
    reasons = [r for r in (why, changed, note) if r]
    if why or changed:
        return dict(result, status="missed", reason="; ".join(reasons))
    return dict(result, status="covered", reason=note)
