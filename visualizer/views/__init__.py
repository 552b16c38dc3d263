"""Interactive attention views in the browser: one self-contained HTML page per view.

Four views, each a function that returns a :class:`Page`::

    from visualizer import views
    page = views.head_view(layers, tokens)       # hover a token: where it attends
    page = views.model_view(layers, tokens)      # layers x heads thumbnails + a head view
    page = views.image_view(layers, image)       # hover a patch: its attention on the image
    page = views.generation_view(layers, tokens, prompt_length)  # step through generation
    page = views.relevance_view(rows, tokens)    # what an output rests on (attribution)
    page.save("attention.html")                  # opens offline in any browser
    page                                         # shown inline in a notebook

``layers`` is a list of per-layer attention arrays in forward order, each
``(heads, N, N)`` or ``(batch, heads, N, N)`` (``sample=`` picks one), or a
single array for one layer, or the dict that ``get_local.by_module(model,
cache)`` returns (its names label the layers).  NumPy arrays and torch
tensors are both accepted.

A page loads nothing: its JavaScript (plain, no framework, beside this module
in ``pages/``) and its data are inlined, so it works from a file, offline,
and inline in Jupyter, JupyterLab, VS Code and Colab (``_repr_html_`` gives
an ``<iframe srcdoc>``, which needs no require.js).  Token strings, layer
names and titles are data, never HTML: a token ``<img src=x onerror=...>``
shows as that text and runs nothing.

Large inputs stay small and responsive: maps are embedded exactly (float32)
when they take at most 4 MiB, else as 8-bit codes with one scale per row
(error at most 1/510 of the row's maximum); above ``max_bytes`` of codes,
tokens are pooled in blocks (image patches in squares), and the page says so.
"""
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .._errors import VisualizerTypeError, VisualizerValueError

__all__ = ["Page", "head_view", "model_view", "image_view", "generation_view",
           "relevance_view", "save", "load", "views_from_cache", "write_index"]


class Page:
    """One self-contained HTML page: ``.html`` (the document), ``.save(path)``, notebook display.

    ``info`` says what the page holds: the view, layers, heads, tokens, the
    tokens per pooled block (1: not pooled) and the precision of the maps
    (``'f4'`` exact or ``'u8'`` 8-bit).
    """

    def __init__(self, html: str, view: str, height: int, info: Dict[str, Any]) -> None:
        self.html = html
        self.view = view
        self.height = height
        self.info = info

    @property
    def nbytes(self) -> int:
        """Size of the page in bytes (UTF-8)."""
        return len(self.html.encode("utf-8"))

    def save(self, path: "os.PathLike[str] | str") -> str:
        """Write the page to ``path`` (parent folders are created); return the path.

        >>> page.save("attention.html")   # doctest: +SKIP
        'attention.html'
        """
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.html)
        return path

    def _repr_html_(self) -> str:
        from .pages import iframe

        return iframe(self.html, self.height)

    def __repr__(self) -> str:
        return "<Page {} view: {} layers, {} heads, {} tokens, {:.1f} kB>".format(
            self.view, len(self.info.get("layers", ())), self.info.get("heads"),
            self.info.get("tokens"), self.nbytes / 1000)


def _tokens(tokens, n, what="tokens"):
    if tokens is None:
        return [str(i) for i in range(n)]
    if isinstance(tokens, str):
        raise VisualizerTypeError(
            "expected {} as a list of strings, got one string {!r}: pass "
            "tokenizer.convert_ids_to_tokens(ids)".format(what, tokens[:40]))
    tokens = [str(t) for t in tokens]
    if len(tokens) != n:
        raise VisualizerValueError(
            "got {} {} for attention over {} tokens: pass one string per position, padding "
            "included".format(len(tokens), what, n))
    return tokens


def _title(title, default):
    if title is None:
        return default
    if not isinstance(title, str):
        raise VisualizerTypeError("expected title as a string, got {}".format(type(title).__name__))
    return title


def _prepare(attentions, sample, precision, max_bytes, grid=None, prefix=0):
    """Return ``(labels, maps, encoded, block, dtype, notes)`` for a page."""
    from .pages import _data

    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1024:
        raise VisualizerValueError(
            "max_bytes must be an int of at least 1024, got {!r}".format(max_bytes))
    labels, maps = _data.stack_layers(attentions, sample)
    layers, heads, n = maps.shape[0], maps.shape[1], maps.shape[-1]
    dtype = _data.pick_dtype(precision, maps.nbytes)
    notes = []
    block = 1
    budget = max_bytes if dtype == "u8" else max_bytes // 4
    if layers * heads * n * n > budget:
        block = _data.choose_block(layers * heads, n, budget, grid, prefix)
        if block > 1:
            maps = _data.pool(maps, block, grid, prefix)
            notes.append("{} tokens are shown in {} of {} (queries averaged, keys summed) to "
                         "keep the page small (max_bytes={})".format(
                             n, "blocks" if grid is None else "squares",
                             block if grid is None else "{}x{} patches".format(block, block),
                             max_bytes))
    if dtype == "u8":
        notes.append("values stored in 8 bits (error at most 0.2% of each row's maximum)")
    return labels, maps, _data.encode_maps(maps, dtype), block, dtype, notes, n


def _block_labels(tokens, block):
    if block == 1:
        return tokens
    out = []
    for start in range(0, len(tokens), block):
        part = tokens[start:start + block]
        out.append("{}-{}: {}".format(start, start + len(part) - 1, " ".join(part)))
    return out


def _text_page(view, attentions, tokens, sample, title, precision, max_bytes, extra=None):
    from . import pages
    from .pages import _data

    labels, maps, encoded, block, dtype, notes, n = _prepare(attentions, sample, precision,
                                                              max_bytes)
    tokens = _tokens(tokens, n)
    rows = _block_labels(tokens, block)
    data = {"layers": labels, "heads": int(maps.shape[1]), "tokens": tokens, "labels": rows,
            "maps": encoded, "block": block, "note": "; ".join(notes)}
    if view == "model":
        size, thumbs = _data.thumbnails(maps)
        data["thumbs"] = {"size": int(size), "data": _data.b64(thumbs)}
    if extra:
        data.update(extra)
    default = "{} view: {} layer{}, {} heads, {} tokens".format(
        view, len(labels), "" if len(labels) == 1 else "s", maps.shape[1], n)
    html = pages.render(view, data, _title(title, default))
    shown = len(rows)
    row_px = 20 if shown <= 60 else 12 if shown <= 600 else max(1, 2400 // shown)
    height = min(900, 190 + row_px * shown)
    if view == "model":
        height = min(1400, height + 30 + 64 * len(labels))
    if view == "generation":
        height = min(900, 230 + 30 * (1 + sum(len(t) + 2 for t in tokens) // 100))
    info = {"view": view, "layers": labels, "heads": int(maps.shape[1]), "tokens": n,
            "block": block, "dtype": dtype}
    return Page(html, view, height, info)


def head_view(attentions: Any, tokens: Optional[Sequence[str]] = None, *, sample: int = 0,
              title: Optional[str] = None, precision: str = "auto",
              max_bytes: int = 24 * 2 ** 20) -> Page:
    """Return a page with the head view: tokens on both sides, hover one to see its attention.

    Hover a token on the left (a query) to see where it attends, one on the
    right (a key) to see who attends to it; click to pin.  Layer and head
    selectors (``mean of heads`` included).  ``tokens`` has one string per
    position (default: the positions).  ``precision`` is ``'auto'``,
    ``'float32'`` or ``'uint8'``; ``max_bytes`` bounds the embedded maps.

    >>> import numpy as np
    >>> page = head_view([np.full((2, 3, 3), 1 / 3)], ["[CLS]", "hi", "[SEP]"])
    >>> page.info["heads"], "<script" in page.html
    (2, True)
    """
    return _text_page("head", attentions, tokens, sample, title, precision, max_bytes)


def model_view(attentions: Any, tokens: Optional[Sequence[str]] = None, *, sample: int = 0,
               title: Optional[str] = None, precision: str = "auto",
               max_bytes: int = 24 * 2 ** 20) -> Page:
    """Return a page with the model view: a layers x heads grid of thumbnails over a head view.

    Click a thumbnail to open that layer and head in the head view below it.
    Arguments as :func:`head_view`.

    >>> import numpy as np
    >>> model_view([np.full((2, 3, 3), 1 / 3)] * 4).info["layers"][-1]
    'layer 4'
    """
    return _text_page("model", attentions, tokens, sample, title, precision, max_bytes)


def generation_view(attentions: Any, tokens: Sequence[str], prompt_length: int, *,
                    sample: int = 0, title: Optional[str] = None, precision: str = "auto",
                    max_bytes: int = 24 * 2 ** 20) -> Page:
    """Return a page that steps through generated tokens, shading what each one came from.

    ``attentions`` holds stitched ``(batch, heads, T, T)`` maps per layer (as
    ``visualizer.generation.stitch`` makes them; row ``i`` is position ``i``'s
    attention), ``tokens`` the ``T`` strings, prompt first, and
    ``prompt_length`` the number of prompt tokens.  Step ``s`` shows the token
    at position ``prompt_length + s`` and the attention of the query that
    produced it (position ``prompt_length + s - 1``) over the tokens before it.

    >>> import numpy as np
    >>> causal = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]
    >>> generation_view([causal[None]], ["a", "b", "c", "d"], prompt_length=2).view
    'generation'
    """
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int):
        raise VisualizerTypeError(
            "expected prompt_length as an int, got {!r}".format(prompt_length))
    count = len(tokens) if tokens is not None and not isinstance(tokens, str) else None
    if prompt_length < 1 or (count is not None and prompt_length >= count):
        raise VisualizerValueError(
            "prompt_length={} leaves no generated token among {} tokens: pass the number of "
            "prompt tokens, at least 1 and less than the number of tokens".format(
                prompt_length, count))
    page = _text_page("generation", attentions, tokens, sample, title, precision,
                      max_bytes=max(int(max_bytes), 2 ** 62), extra={"prompt_length": prompt_length})
    return page


def image_view(attentions: Any, image: Any, *, grid: Any = None,
               num_prefix_tokens: Optional[int] = None, sample: int = 0,
               title: Optional[str] = None, rollout: bool = True, precision: str = "auto",
               max_bytes: int = 24 * 2 ** 20) -> Page:
    """Return a page with the image view: hover a patch to see its attention over the image.

    ``image`` is the image the model saw, ``(H, W, 3)`` uint8 or floats in
    [0, 1] (see :func:`visualizer.plotting.model_input_image`), or a PIL
    image.  The patch grid and the number of prefix tokens (CLS, registers)
    are inferred as in :mod:`visualizer.plotting` unless given.  Hover a
    patch to make it the query, click to pin it, or press *CLS query*; pick
    a layer and a head or their mean, or the attention rollout (mean of heads,
    residual added) through the chosen layer.  Each query's weights over the
    patches are renormalised to their sum, coloured from 0 to their maximum.

    >>> import numpy as np
    >>> page = image_view([np.full((2, 5, 5), 0.2)], np.zeros((32, 32, 3)))
    >>> page.info["grid"], page.info["prefix"]
    ((2, 2), 1)
    """
    from . import pages
    from .. import attention
    from .pages import _data

    labels, full = _data.stack_layers(attentions, sample)
    n = full.shape[-1]
    (rows, cols), prefix = attention.patch_grid(n, grid, num_prefix_tokens)
    rgb = _data.image_uint8(image)
    labels, maps, encoded, block, dtype, notes, n = _prepare(
        dict(zip(labels, full)), 0, precision, max_bytes, (rows, cols), prefix)
    shown_grid = (-(-rows // block), -(-cols // block))
    data = {"layers": labels, "heads": int(maps.shape[1]), "maps": encoded,
            "grid": list(shown_grid), "prefix": prefix, "block": block,
            "image": _data.png_data_uri(rgb), "image_size": [int(rgb.shape[0]), int(rgb.shape[1])],
            "note": "; ".join(notes)}
    if rollout:
        # the rollout after each layer, with the mean of heads (float64, as the figures)
        rolled = attention.rollout(full, each=True).astype("float32")
        if block > 1:
            rolled = _data.pool(rolled, block, (rows, cols), prefix)
        data["rollout"] = _data.encode_maps(rolled, dtype)
    if rgb.shape[0] % rows or rgb.shape[1] % cols:
        data["note"] = "; ".join(notes + [
            "the image ({}x{} pixels) does not split into the {}x{} patch grid: is it the image "
            "the model saw?".format(rgb.shape[0], rgb.shape[1], rows, cols)])
    default = "image view: {} layer{}, {} heads, {}x{} patches{}".format(
        len(labels), "" if len(labels) == 1 else "s", maps.shape[1], rows, cols,
        " + {} prefix token{}".format(prefix, "" if prefix == 1 else "s") if prefix else "")
    html = pages.render("image", data, _title(title, default))
    info = {"view": "image", "layers": labels, "heads": int(maps.shape[1]), "tokens": n,
            "grid": (rows, cols), "prefix": prefix, "block": block, "dtype": dtype}
    return Page(html, "image", 640, info)


# ---------------------------------------------------------------------------
# Files: captures with what their views need
# ---------------------------------------------------------------------------

def save(path: Any, cache: Dict[str, list], *, tokens: Optional[Sequence[str]] = None,
         image: Any = None, grid: Any = None, num_prefix_tokens: Optional[int] = None,
         prompt_length: Optional[int] = None, layers: Optional[Sequence[str]] = None,
         title: Optional[str] = None) -> None:
    """Save ``cache`` like ``get_local.save``, with what a view of it needs, without pickle.

    ``tokens`` (strings), ``image`` (the image the model saw, stored as
    uint8), ``grid``, ``num_prefix_tokens``, ``prompt_length``, ``layers``
    (layer names, e.g. the keys of ``get_local.by_module``) and ``title`` go
    into the file's JSON manifest and arrays; ``visualizer view FILE`` and
    :func:`views_from_cache` use them.  Files without them still load.

    >>> views.save("caps.npz", cache, tokens=tokens)   # doctest: +SKIP
    """
    from .. import storage

    context = {}  # type: Dict[str, Any]
    if tokens is not None:
        if isinstance(tokens, str):
            raise VisualizerTypeError("expected tokens as a list of strings, got one string")
        context["tokens"] = [str(t) for t in tokens]
    if image is not None:
        from .pages import _data

        context["image"] = _data.image_uint8(image)
    if grid is not None:
        context["grid"] = [int(grid), int(grid)] if isinstance(grid, int) else [int(g) for g in grid]
    for name, value in (("num_prefix_tokens", num_prefix_tokens),
                        ("prompt_length", prompt_length)):
        if value is not None:
            context[name] = int(value)
    if layers is not None:
        context["layers"] = [str(name) for name in layers]
    if title is not None:
        context["title"] = str(title)
    storage.save(cache, path, context=context)


def load(path: Any):
    """Return ``(cache, context)`` from a file: the captures and what :func:`save` added.

    Reads every format ``get_local.load`` reads (an ``.npz``, the manifest of
    a run's ranks, a stream folder).  ``context`` is ``{}`` for files saved
    without it (``get_local.save``) and for stream folders, which record none.
    """
    from .. import storage

    return storage.load(path), storage.load_context(path)


def _attention_keys(cache):
    """Keys whose values are all square maps of one shape (``attention.why_not_maps``)."""
    import numpy as np

    from ..attention import why_not_maps

    found = []
    for key, values in cache.items():
        arrays = [v for v in values if hasattr(v, "ndim")]
        if not arrays or len(arrays) != len(values):
            continue
        shapes = {tuple(np.shape(v)) for v in arrays}
        if len(shapes) != 1:
            continue
        if why_not_maps(arrays[0]) is None:
            found.append(key)
    return found


def views_from_cache(cache: Dict[str, list], context: Optional[Dict[str, Any]] = None, *,
                     key: Optional[str] = None, view: Optional[str] = None,
                     sample: int = 0) -> List[Any]:
    """Return ``[(key, Page)]``: one page per attention key of ``cache`` (or just ``key``).

    Each call of a key is taken as one layer, in order (a ViT's
    ``'Attention.forward'`` holds one value per block).  The view is
    ``'image'`` when the context holds an image, ``'generation'`` when it
    holds ``prompt_length``, else ``'model'``; ``view`` overrides it.
    """
    context = dict(context or {})
    keys = _attention_keys(cache)
    if key is not None:
        if key not in cache:
            raise VisualizerValueError("no key {!r}; the keys are: {}".format(key, ", ".join(cache)))
        if key not in keys:
            raise VisualizerValueError(
                "{!r} does not hold attention maps of one shape (heads, N, N)".format(key))
        keys = [key]
    if not keys:
        raise VisualizerValueError(
            "no attention maps to view: no key holds arrays shaped (batch, heads, N, N), "
            "(heads, N, N) or (N, N), all of one shape")
    if view is None:
        view = ("image" if "image" in context else
                "generation" if "prompt_length" in context else "model")
    if view not in ("head", "model", "image", "generation"):
        raise VisualizerValueError(
            "unknown view {!r}: use head, model, image or generation".format(view))
    out = []
    for k in keys:
        values = cache[k]
        names = context.get("layers")
        if names and len(names) == len(values):
            layers = dict(zip(names, values))
        else:
            layers = {"{} call {}".format(k, i + 1): v for i, v in enumerate(values)}
        title = context.get("title") or k
        tokens = context.get("tokens")
        n = values[0].shape[-1]
        if tokens is not None and len(tokens) != n:
            tokens = None
        if view == "image":
            if "image" not in context:
                raise VisualizerValueError(
                    "the image view needs the image the model saw: save it with "
                    "visualizer.views.save(path, cache, image=...)")
            page = image_view(layers, context["image"], grid=context.get("grid"),
                              num_prefix_tokens=context.get("num_prefix_tokens"),
                              sample=sample, title=title)
        elif view == "generation":
            if "prompt_length" not in context:
                raise VisualizerValueError(
                    "the generation view needs prompt_length: save it with "
                    "visualizer.views.save(path, cache, prompt_length=...)")
            page = generation_view(layers, tokens, context["prompt_length"], sample=sample,
                                   title=title)
        elif view == "head":
            page = head_view(layers, tokens, sample=sample, title=title)
        else:
            page = model_view(layers, tokens, sample=sample, title=title)
        out.append((k, page))
    return out


def write_index(folder: str, pages: Sequence[Any], figures: Sequence[str] = (),
                title: str = "attention views") -> str:
    """Write ``folder/index.html`` linking ``pages`` and showing ``figures``; return its path.

    ``pages`` holds ``(path, description)`` pairs; ``figures`` holds PNG paths.
    Links are relative, so the folder can be moved or zipped; every name and
    description is HTML-escaped.
    """
    import html

    def link(path):
        return html.escape(os.path.relpath(path, folder).replace(os.sep, "/"), quote=True)

    parts = ["<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>",
             html.escape(title), "</title><style>body{font:14px/1.5 sans-serif;margin:20px;"
             "color:#222}img{max-width:420px;border:1px solid #ddd;margin:4px}"
             "figure{display:inline-block;margin:6px;vertical-align:top}"
             "figcaption{font-size:12px;color:#555}</style></head><body><h1>",
             html.escape(title), "</h1><h2>Interactive pages</h2><ul>"]
    for path, description in pages:
        parts += ["<li><a href=\"", link(path), "\">", html.escape(os.path.basename(path)),
                  "</a>: ", html.escape(description), "</li>"]
    parts.append("</ul>")
    if figures:
        parts.append("<h2>Figures</h2>")
        for path in figures:
            parts += ["<figure><a href=\"", link(path), "\"><img src=\"", link(path),
                      "\" alt=\"\"></a><figcaption>", html.escape(os.path.basename(path)),
                      "</figcaption></figure>"]
    parts.append("</body></html>\n")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "index.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(parts))
    return path


# -- the relevance page: visualizer.attribution's results, beside relevance_view.js ----------


def relevance_view(relevance: Any, tokens: Optional[Sequence[str]] = None, *,
                   image: Any = None, grid: Any = None,
                   num_prefix_tokens: Optional[int] = None,
                   targets: Optional[Sequence[str]] = None,
                   positions: Optional[Sequence[int]] = None,
                   title: Optional[str] = None) -> Any:
    """Return a page that shades the tokens, or the image's patches, by their relevance.

    ``relevance`` holds rows over the ``T`` tokens, one per explained output
    (``(K, T)``, or ``(T,)`` for one): ``R[b, 0]`` of
    :func:`visualizer.attribution.relevance` for a ViT's or BERT's class,
    ``R[b, -1]`` for a decoder's next token.  A dict from a method's name to
    such rows (``{'relevance': ..., 'rollout': ..., 'raw attention': ...}``,
    all of one shape) puts a method selector on the page.  ``targets`` names
    the ``K`` outputs; ``positions`` gives the position each explains (a
    generated token's): the tokens from there on are greyed, and the token
    itself outlined.  With ``image`` (the image the model saw, see
    :func:`visualizer.plotting.model_input_image`) the patches are shaded
    over it, each row's positive share over the patches coloured from 0 to
    its largest; the grid and prefix tokens are inferred unless given.

    >>> import numpy as np
    >>> page = relevance_view(np.array([0.0, 0.6, 0.3, 0.1]), ["[CLS]", "a", "cat", "[SEP]"])
    >>> page.view, page.info["targets"]
    ('relevance', 1)
    """
    import numpy as np

    from ..attention import as_array, patch_grid
    from .pages import _data, render

    methods = relevance if isinstance(relevance, Mapping) else {"relevance": relevance}
    if not methods:
        raise VisualizerValueError("relevance is an empty dict: give at least one method's rows")
    arrays = {}
    for name, value in methods.items():
        arr = as_array(value, "relevance {!r}".format(name)).astype(np.float32)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.size == 0:
            raise VisualizerValueError(
                "relevance {!r} has shape {}: give rows over the tokens, (K, T) or (T,); for a "
                "relevance matrix R (B, T, T) pick rows, e.g. R[0, :1] or R[0, -1]".format(
                    name, tuple(arr.shape)))
        if not np.all(np.isfinite(arr)):
            raise VisualizerValueError("relevance {!r} contains NaN or inf".format(name))
        arrays[str(name)] = arr
    shapes = {arr.shape for arr in arrays.values()}
    if len(shapes) != 1:
        raise VisualizerValueError(
            "every method needs rows of one shape, got {}".format(
                ", ".join("{!r}: {}".format(k, v.shape) for k, v in arrays.items())))
    k, n = shapes.pop()
    if targets is None:
        targets = ["the output"] if k == 1 else ["output {}".format(i) for i in range(k)]
    elif isinstance(targets, str) or len(targets) != k:
        raise VisualizerValueError(
            "targets must name each of the {} explained outputs (one string per row), got "
            "{!r}".format(k, targets))
    data = {"methods": list(arrays), "values": [_data.b64(a) for a in arrays.values()],
            "k": int(k), "n": int(n), "targets": [str(t) for t in targets]}
    if positions is not None:
        positions = [int(p) for p in positions]
        if len(positions) != k or not all(0 <= p <= n for p in positions):
            raise VisualizerValueError(
                "positions must give, for each of the {} rows, the position it explains "
                "(0 to {}), got {!r}".format(k, n, positions))
        data["positions"] = positions
    if image is not None:
        (rows, cols), prefix = patch_grid(n, grid, num_prefix_tokens)
        rgb = _data.image_uint8(image)
        data.update(image=_data.png_data_uri(rgb), image_size=[int(rgb.shape[0]),
                                                              int(rgb.shape[1])],
                    grid=[rows, cols], prefix=prefix)
        default = "relevance over {}x{} patches".format(rows, cols)
        height = 640
    else:
        if tokens is None:
            raise VisualizerTypeError(
                "relevance_view needs the tokens (one string per position) or the image")
        data["tokens"] = _tokens(tokens, n)
        default = "relevance over {} tokens".format(n)
        height = min(900, 200 + 30 * (1 + sum(len(t) + 2 for t in data["tokens"]) // 100))
    html = render("relevance", data, _title(title, default))
    info = {"view": "relevance", "methods": list(arrays), "targets": int(k), "tokens": int(n)}
    if image is not None:
        info.update(grid=(rows, cols), prefix=prefix)
    return Page(html, "relevance", height, info)

