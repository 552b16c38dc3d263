"""The relevance page: which tokens or image patches an output rests on, method by method.

Beside ``relevance_view.js``; the maps come from :mod:`visualizer.attribution`.
"""
from typing import Any, Mapping, Optional, Sequence

from ..._errors import VisualizerTypeError, VisualizerValueError

__all__ = ["relevance_view"]


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

    from .. import Page, _title, _tokens
    from . import _data, render

    methods = relevance if isinstance(relevance, Mapping) else {"relevance": relevance}
    if not methods:
        raise VisualizerValueError("relevance is an empty dict: give at least one method's rows")
    arrays = {}
    for name, value in methods.items():
        arr = _data.to_numpy(value, "relevance {!r}".format(name)).astype(np.float32)
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
        (rows, cols), prefix = _data.infer_grid(n, grid, num_prefix_tokens)
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
