"""Draw captured attention maps: heads, token grids, patch overlays and rollout.

This is the only module of visualizer that imports matplotlib (and Pillow,
which every matplotlib install brings).  Every ``plot_*`` function builds a
:class:`matplotlib.figure.Figure` directly, never through ``pyplot``, so
nothing depends on a global backend or on pyplot's current figure, and
nothing is shown: display the returned figure in a notebook, or write it with
:func:`save_figure`.

Inputs are attention probabilities as captured from a ViT or BERT layer:
``(heads, N, N)`` for one sample, or ``(batch, heads, N, N)`` with ``sample=``
choosing the sample.  NumPy arrays, nested lists and torch tensors are all
accepted (torch is never imported here; ``visualizer.attention`` converts
tensors, infers patch grids and computes the rollout).

Conventions a reader needs to know:

* **Patch order** is row-major, as ViT flattens its patch grid: patch ``i``
  sits at ``(i // cols, i % cols)``.  Tokens ``0 .. num_prefix_tokens - 1``
  (the CLS token, distillation or register tokens) come before the patches.
* **Overlay normalisation**: the row of one query is cut to the patch tokens
  (prefix tokens dropped) and divided by its sum, so the overlay shows how the
  query's attention *over the patches* is shared; the colour scale runs from 0
  to the largest patch weight.
* **Overlays are drawn on the image the model saw.**  Use
  :func:`model_input_image` to get it from the original photo (timm's eval
  resize + centre crop); a patch ``(r, c)`` then covers pixels
  ``[r * ph, (r + 1) * ph) x [c * pw, (c + 1) * pw)``.
* **Rollout** (:func:`attention_rollout`) is ``A_L @ ... @ A_1`` with
  ``A_l = rownorm(fuse(heads_l) + I)``, row ``i`` saying how much output
  token ``i`` draws from each input token.

>>> import numpy as np
>>> from visualizer.views.figures import plot_heads
>>> attn = np.full((4, 5, 5), 0.2)       # 4 heads, CLS + 2x2 patches
>>> fig = plot_heads(attn)
>>> sum(ax.get_visible() and bool(ax.images) for ax in fig.axes)  # 4 heads + mean
5
"""
import math
import os
import warnings
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .._errors import VisualizerTypeError, VisualizerValueError
from ..attention import (as_array, parse_grid, patch_grid, positive_pair, rollout, sample_maps,
                         to_numpy)

__all__ = [
    "plot_head",
    "plot_heads",
    "plot_query_on_image",
    "model_input_image",
    "plot_highlighted_patches",
    "plot_token_attention",
    "attention_rollout",
    "plot_rollout_on_image",
    "save_figure",
]

GridLike = Union[int, Tuple[int, int]]
PatchLike = Union[int, Tuple[int, int]]

# model_input_image's crop_pct when neither the call nor a config gives one: the
# share of the resized image that the usual ImageNet evaluation keeps (resize
# to 256, centre crop 224).  A model's own value comes from its config.
DEFAULT_CROP_PCT = 0.875
# The 'border' crop mode's fill when no config gives a mean: the ImageNet mean colour.
DEFAULT_MEAN = (0.485, 0.456, 0.406)


# ---------------------------------------------------------------------------
# Input normalisation
# ---------------------------------------------------------------------------

def _select_head(attn, head):
    """Return the ``(Nq, Nk)`` map of ``head``, or the mean over heads for ``None``."""
    if head is None:
        return attn.mean(axis=0)
    if not isinstance(head, (int, np.integer)) or isinstance(head, bool):
        raise VisualizerTypeError("expected head as an int or None (mean of heads), got {!r}".format(head))
    if not -attn.shape[0] <= head < attn.shape[0]:
        raise VisualizerValueError(
            "head={} is out of range for attention with {} heads: pass head between 0 and {}, "
            "or head=None for the mean".format(head, attn.shape[0], attn.shape[0] - 1)
        )
    return attn[head]


def _patch_rc(patch, grid, what="patch"):
    """Return ``(row, col)`` of a patch given as a row-major index or a ``(row, col)`` pair."""
    rows, cols = grid
    if isinstance(patch, (int, np.integer)) and not isinstance(patch, bool):
        if not 0 <= patch < rows * cols:
            raise VisualizerValueError(
                "{} index {} is outside the {}x{} patch grid: pass an index between 0 and {} "
                "(row-major) or a (row, col) pair".format(what, patch, rows, cols, rows * cols - 1)
            )
        return int(patch) // cols, int(patch) % cols
    try:
        r, c = patch
        r, c = int(r), int(c)
    except (TypeError, ValueError):
        raise VisualizerTypeError(
            "expected {} as a patch index or a (row, col) pair, got {!r}".format(what, patch)
        ) from None
    if not (0 <= r < rows and 0 <= c < cols):
        raise VisualizerValueError(
            "{} (row, col)=({}, {}) is outside the {}x{} patch grid".format(what, r, c, rows, cols)
        )
    return r, c


def _is_pathlike(value):
    return isinstance(value, (str, bytes, os.PathLike))


def _pil_image(image):
    """Return ``image`` as an RGB PIL image if it is a PIL image, path or file; else None."""
    from PIL import Image

    if _is_pathlike(image) or hasattr(image, "read"):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    return None


def _image_array(image, what="image"):
    """Return ``image`` as an ``(H, W, 3)`` float array in [0, 1], without resizing it."""
    pil = _pil_image(image)
    if pil is not None:
        return np.asarray(pil, dtype=np.float32) / 255.0
    arr = np.asarray(to_numpy(image))
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        hint = ""
        if arr.ndim == 3 and arr.shape[0] in (1, 3):
            hint = " (channels first? pass image.transpose(1, 2, 0))"
        raise VisualizerValueError(
            "expected {} of shape (height, width, 3), got shape {}{}".format(what, tuple(arr.shape), hint)
        )
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]  # drop alpha, as PIL's convert("RGB") does
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise VisualizerTypeError(
            "expected {} as uint8 in [0, 255] or float in [0, 1], got dtype {}".format(what, arr.dtype)
        )
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise VisualizerValueError("{} contains NaN or inf".format(what))
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        if lo >= 0 and hi <= 255:
            fix = "looks like 0..255 values: pass image.astype('uint8') or image / 255"
        else:
            fix = ("looks normalised by mean/std: pass the unnormalised image, e.g. "
                   "model_input_image(original_photo, ...)")
        raise VisualizerValueError(
            "expected {} values in [0, 1], got range [{:.3g}, {:.3g}]: {}".format(what, lo, hi, fix)
        )
    return np.clip(arr, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def _new_figure(figsize):
    try:
        return Figure(figsize=figsize, layout="constrained")
    except TypeError:  # matplotlib < 3.5 has no layout= argument
        return Figure(figsize=figsize, constrained_layout=True)


def _figure_and_axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    fig = _new_figure(figsize)
    return fig, fig.add_subplot(1, 1, 1)


def plot_head(
    attn: Any,
    head: Optional[int] = 0,
    sample: int = 0,
    *,
    cmap: str = "viridis",
    title: Optional[str] = None,
    ax: Any = None,
    figsize: Tuple[float, float] = (5.0, 4.2),
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
) -> Figure:
    """Draw one head's attention map as a heatmap with a labelled colorbar.

    Rows are queries and columns keys, so row ``i`` is how token ``i`` shares
    its attention.  ``attn`` is ``(heads, Nq, Nk)``, ``(batch, heads, Nq, Nk)``
    (pick the sample with ``sample``) or a single ``(Nq, Nk)`` map;
    ``head=None`` draws the mean over heads.  The colour scale runs from the
    map's minimum to its maximum unless ``vmin``/``vmax`` fix it (pass the same
    ones to figures you compare).  Pass ``ax`` to draw into an existing axes.

    >>> import numpy as np
    >>> fig = plot_head(np.eye(4)[None], head=0)
    >>> fig.axes[0].images[0].get_array().shape
    (4, 4)
    """
    arr = sample_maps(attn, sample, square=False)
    data = _select_head(arr, head)
    fig, ax = _figure_and_axes(ax, figsize)
    im = ax.imshow(data, cmap=cmap, interpolation="nearest", aspect="equal", vmin=vmin, vmax=vmax)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title is None:
        title = "mean of {} heads".format(arr.shape[0]) if head is None else "head {}".format(head)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.9).set_label("attention weight")
    return fig


def plot_heads(
    attn: Any,
    sample: int = 0,
    *,
    ncols: Optional[int] = None,
    mean: bool = True,
    shared_scale: bool = True,
    cmap: str = "viridis",
    title: Optional[str] = None,
    panel_size: float = 2.6,
    tokens: Optional[Sequence[Any]] = None,
    vmax: Optional[float] = None,
) -> Figure:
    """Draw every head of one layer in a grid, plus a panel with their mean.

    Panels are filled row by row (``ncols`` per row, by default at most 4);
    panels left over in the last row are hidden.  With ``shared_scale`` all
    panels use one colour scale (min to max over every head) and one colorbar,
    so heads can be compared; otherwise each panel has its own colorbar.
    Works for any number of heads, including one (head + mean panel).
    ``tokens`` (one string per position) label the query axis of the left
    column and the key axis of the bottom row (every k-th token when there
    are too many to read); without them the outer axes say query and key.
    ``vmax`` fixes the top of the shared scale (e.g. to compare layers).

    >>> import numpy as np
    >>> fig = plot_heads(np.full((6, 3, 3), 1 / 3), ncols=4)
    >>> [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.images][-1]
    'mean'
    """
    arr = sample_maps(attn, sample, square=False)
    heads = arr.shape[0]
    panels = [(arr[h], "head {}".format(h)) for h in range(heads)]
    if mean:
        panels.append((arr.mean(axis=0), "mean"))
    if ncols is None:
        ncols = min(4, len(panels))
    if not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise VisualizerValueError("expected ncols as a positive int, got {!r}".format(ncols))
    ncols = min(int(ncols), len(panels))
    nrows = int(math.ceil(len(panels) / ncols))
    n_keys, n_queries = arr.shape[-1], arr.shape[-2]
    if tokens is not None:
        if isinstance(tokens, str) or len(tokens) != n_keys or n_keys != n_queries:
            raise VisualizerValueError(
                "tokens must hold one string per position ({} for attention of shape {}), "
                "got {}".format(n_keys, tuple(arr.shape),
                                "one string" if isinstance(tokens, str) else len(tokens)))
        tokens = [str(t) for t in tokens]
        panel_size = max(panel_size, min(5.0, 0.09 * n_keys + 1.2))
    fig = _new_figure((panel_size * ncols + (1.0 if shared_scale else 0.0), panel_size * nrows + 0.4))
    # squeeze=False keeps a 2-D array of axes even for one row or one column.
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(axes.ravel())
    if shared_scale:
        vmin = float(arr.min())
        vmax = float(arr.max()) if vmax is None else float(vmax)
    used = []
    im = None
    step = max(1, int(math.ceil(n_keys / 40.0)))
    fontsize = float(np.clip(0.75 * panel_size * 72.0 / (n_keys / step), 3.0, 8.0))
    for index, (ax, (data, label)) in enumerate(zip(flat, panels)):
        if shared_scale:
            im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        else:
            im = ax.imshow(data, cmap=cmap, interpolation="nearest")
            fig.colorbar(im, ax=ax, shrink=0.8).set_label("attention weight")
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        left = index % ncols == 0
        bottom = index + ncols >= len(panels)
        if tokens is not None and left:
            ax.set_yticks(np.arange(0, n_queries, step))
            ax.set_yticklabels(tokens[::step], fontsize=fontsize)
        if tokens is not None and bottom:
            ax.set_xticks(np.arange(0, n_keys, step))
            ax.set_xticklabels(tokens[::step], fontsize=fontsize, rotation=90)
        if tokens is None:  # positions, so a reader can still name a row or a column
            if left:
                ax.set_yticks(_position_ticks(n_queries))
            if bottom:
                ax.set_xticks(_position_ticks(n_keys))
            ax.tick_params(labelsize=7)
        if left:
            ax.set_ylabel("query", fontsize=8)
        if bottom:
            ax.set_xlabel("key", fontsize=8)
        used.append(ax)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    if shared_scale:
        fig.colorbar(im, ax=used, shrink=0.8).set_label(
            "attention weight (one scale for every panel)")
    if title is not None:
        fig.suptitle(title)
    return fig


def _position_ticks(n):
    """At most about six evenly spaced positions from 0 to ``n - 1``, the last included."""
    import numpy as np

    step = max(1, int(math.ceil((n - 1) / 5.0)))
    ticks = list(range(0, n, step))
    if ticks[-1] != n - 1 and n - 1 - ticks[-1] >= step / 2.0:
        ticks.append(n - 1)
    return np.array(ticks)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _resample(name):
    from PIL import Image

    if name not in _INTERPOLATIONS:
        raise VisualizerValueError(
            "unknown interpolation {!r}: use one of {}".format(name, ", ".join(_INTERPOLATIONS))
        )
    resampling = getattr(Image, "Resampling", Image)  # Pillow < 9.1 keeps the constants on Image
    return getattr(resampling, name.upper())


def _resize(image, width, height, interpolation):
    """Resize a PIL image or a float ``(H, W, 3)`` array to ``width`` x ``height``."""
    from PIL import Image

    resample = _resample(interpolation)
    if isinstance(image, Image.Image):
        return image.resize((width, height), resample)
    # Float arrays are resized channel by channel in Pillow's 32-bit float mode
    # so no precision is lost to a uint8 round trip.
    channels = []
    for c in range(image.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))
        channels.append(np.asarray(plane.resize((width, height), resample)))
    # bicubic and lanczos overshoot a little at edges; keep [0, 1] as promised
    return np.clip(np.stack(channels, axis=2), 0.0, 1.0)


def _size_of(image):
    if hasattr(image, "size") and not isinstance(image, np.ndarray):
        return image.size[1], image.size[0]  # PIL: (width, height)
    return image.shape[0], image.shape[1]


def _crop_or_pad(image, crop_h, crop_w, fill):
    """Centre-crop ``image`` to ``crop_h`` x ``crop_w``, padding with ``fill`` first if smaller.

    Offsets follow torchvision's ``center_crop`` (``int(round((H - h) / 2))``)
    and timm's ``center_crop_or_pad`` (left/top padding ``(h - H) // 2``).
    """
    arr = image if isinstance(image, np.ndarray) else np.asarray(image, dtype=np.float32) / 255.0
    h, w = arr.shape[:2]
    if crop_h > h or crop_w > w:
        top = (crop_h - h) // 2 if crop_h > h else 0
        left = (crop_w - w) // 2 if crop_w > w else 0
        padded = np.empty((max(h, crop_h), max(w, crop_w), 3), dtype=np.float32)
        padded[...] = np.asarray(fill, dtype=np.float32)
        padded[top:top + h, left:left + w] = arr
        arr = padded
        h, w = arr.shape[:2]
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return np.ascontiguousarray(arr[top:top + crop_h, left:left + crop_w], dtype=np.float32)


def model_input_image(
    image: Any,
    size: Union[int, Tuple[int, int], Mapping[str, Any], Any] = 224,
    crop_pct: Optional[float] = DEFAULT_CROP_PCT,
    *,
    resize: Optional[int] = None,
    interpolation: str = "bicubic",
    crop_mode: str = "center",
) -> np.ndarray:
    """Return the image as the model saw it: resized, centre-cropped, RGB floats in [0, 1].

    Reproduces timm's eval transform (``timm.data.create_transform`` with
    ``is_training=False``) up to, not including, ``ToTensor``/``Normalize``:
    the short side is resized to ``floor(size / crop_pct)`` with Pillow
    (``interpolation``, bicubic by default as for ViTs), then the centre
    ``size`` x ``size`` is cut out.  Draw overlays on the result so that patch
    ``(r, c)`` of the attention lies on the pixels the model cut it from.

    ``image`` is a PIL image, a path or open file, or an ``(H, W, 3)`` array
    (uint8, or float in [0, 1]).  ``size`` is the crop (an int, or
    ``(height, width)``), a data config, e.g.
    ``timm.data.resolve_data_config({}, model=model)``, or the model itself
    when it carries one as ``pretrained_cfg`` (timm's models do); the
    config's ``input_size``, ``crop_pct``, ``interpolation``, ``crop_mode``
    and ``mean`` are then used.  Without a config, or when it gives none,
    ``crop_pct`` is ``DEFAULT_CROP_PCT`` (0.875: resize to 256, crop 224, the
    usual ImageNet evaluation).  For an explicit torchvision-style pair ``Resize(256), CenterCrop(224)`` pass
    ``size=224, resize=256`` (``crop_pct`` is then ignored).  ``crop_mode``
    is timm's: ``'center'``, ``'squash'`` (resize both sides, no aspect ratio
    kept) or ``'border'`` (fit the long side, pad with the config's mean colour).
    Returns an ``(H, W, 3)`` float32 array.  uint8 inputs give exactly timm's
    pixels; float inputs are resized in float without rounding to uint8.

    >>> import numpy as np
    >>> photo = np.zeros((300, 400, 3), dtype=np.uint8)
    >>> model_input_image(photo, 224, crop_pct=0.875).shape
    (224, 224, 3)
    >>> model_input_image(photo, 224, resize=256).shape
    (224, 224, 3)
    """
    mean = DEFAULT_MEAN
    own = getattr(size, "pretrained_cfg", None)  # a model that carries its data config
    if isinstance(size, Mapping) or isinstance(own, Mapping):
        config = size if isinstance(size, Mapping) else own
        if "input_size" not in config:
            raise VisualizerValueError(
                "a timm data config needs 'input_size', got keys {}: pass "
                "timm.data.resolve_data_config({{}}, model=model)".format(sorted(config))
            )
        size = tuple(int(s) for s in config["input_size"][-2:])
        crop_pct = config.get("crop_pct", crop_pct)
        interpolation = config.get("interpolation", interpolation) or interpolation
        crop_mode = config.get("crop_mode", crop_mode) or crop_mode
        mean = tuple(config.get("mean", mean))
    crop_h, crop_w = positive_pair(
        size, "size", "an int, a (height, width) pair, a data config or a model with a "
        "pretrained_cfg")
    if crop_mode not in ("center", "squash", "border"):
        raise VisualizerValueError(
            "unknown crop_mode {!r}: use 'center', 'squash' or 'border'".format(crop_mode)
        )
    _resample(interpolation)  # fail early on a bad name

    src = _resizable_image(image)
    img_h, img_w = _size_of(src)

    if resize is not None:
        if not isinstance(resize, (int, np.integer)) or resize <= 0:
            raise VisualizerValueError("expected resize as a positive int (short side), got {!r}".format(resize))
        short, long_ = (img_w, img_h) if img_w <= img_h else (img_h, img_w)
        new_short, new_long = int(resize), int(int(resize) * long_ / short)
        new_w, new_h = (new_short, new_long) if img_w <= img_h else (new_long, new_short)
        return _crop_or_pad(_resize(src, new_w, new_h, interpolation), crop_h, crop_w, 0.0)

    if crop_pct is None:
        crop_pct = DEFAULT_CROP_PCT
    if not crop_pct > 0:
        raise VisualizerValueError("expected crop_pct > 0 (0.875 keeps the centre 87.5%), got {!r}".format(crop_pct))
    scale_h, scale_w = math.floor(crop_h / crop_pct), math.floor(crop_w / crop_pct)
    fill = 0.0
    if crop_mode == "squash":
        new_h, new_w = scale_h, scale_w
    elif crop_mode == "border":
        # timm ResizeKeepRatio(longest=1.0) then CenterCropOrPad(fill=mean).
        ratio = max(img_h / scale_h, img_w / scale_w)
        new_h, new_w = round(img_h / ratio), round(img_w / ratio)
        fill = [round(255 * m) / 255.0 for m in mean]
    elif scale_h == scale_w:
        # torchvision Resize(int): short side to scale, long side truncated.
        short, long_ = (img_w, img_h) if img_w <= img_h else (img_h, img_w)
        new_short, new_long = scale_h, int(scale_h * long_ / short)
        new_w, new_h = (new_short, new_long) if img_w <= img_h else (new_long, new_short)
    else:
        # timm ResizeKeepRatio(longest=0): the side that needs less scaling fits.
        ratio = min(img_h / scale_h, img_w / scale_w)
        new_h, new_w = round(img_h / ratio), round(img_w / ratio)
    return _crop_or_pad(_resize(src, new_w, new_h, interpolation), crop_h, crop_w, fill)


def _resizable_image(image):
    """Return a PIL image for PIL, path and uint8 inputs, else a float ``(H, W, 3)`` array."""
    from PIL import Image

    pil = _pil_image(image)
    if pil is not None:
        return pil
    raw = np.asarray(to_numpy(image))
    arr = _image_array(raw)
    if raw.dtype == np.uint8:
        # uint8 pixels go through Pillow exactly as timm's PIL pipeline does;
        # the round trip through float is exact for uint8.
        return Image.fromarray(np.ascontiguousarray(np.round(arr * 255.0).astype(np.uint8)))
    return arr


def _upsample_matrix(out_size, in_size, mode):
    """Return the ``(out_size, in_size)`` matrix that resamples a 1-D signal."""
    m = np.zeros((out_size, in_size))
    centres = (np.arange(out_size) + 0.5) * in_size / out_size  # in input-cell units
    if mode == "nearest":
        idx = np.minimum(np.floor(centres).astype(int), in_size - 1)
        m[np.arange(out_size), idx] = 1.0
        return m
    # bilinear between cell centres (align_corners=False), clamped at the edges
    pos = np.clip(centres - 0.5, 0, in_size - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    w = pos - lo
    np.add.at(m, (np.arange(out_size), lo), 1.0 - w)
    np.add.at(m, (np.arange(out_size), hi), w)
    return m


def _upsample(patch_map, height, width, mode):
    if mode not in ("nearest", "bilinear"):
        raise VisualizerValueError("unknown upsample {!r}: use 'nearest' or 'bilinear'".format(mode))
    rows = _upsample_matrix(height, patch_map.shape[0], mode)
    cols = _upsample_matrix(width, patch_map.shape[1], mode)
    return rows @ patch_map @ cols.T


def _check_alignment(img, grid):
    h, w = img.shape[:2]
    if h % grid[0] or w % grid[1]:
        warnings.warn(
            "image of {}x{} pixels does not split into the {}x{} patch grid evenly, so it is "
            "probably not the image the model saw and the overlay will be misaligned: pass "
            "model_input_image(image, ...) instead".format(h, w, grid[0], grid[1]),
            UserWarning,
            stacklevel=3,
        )


def _patch_box(r, c, grid, img_shape):
    """Return ``(x0, y0, width, height)`` of patch ``(r, c)`` in imshow data coordinates."""
    ph, pw = img_shape[0] / grid[0], img_shape[1] / grid[1]
    # imshow puts pixel centres on integers, so pixel edges are at -0.5.
    return c * pw - 0.5, r * ph - 0.5, pw, ph


def _patch_ticks(ax, grid, img_shape):
    """Name the rows and columns of the patch grid on the axes (every k-th when many)."""
    rows, cols = grid
    ph, pw = img_shape[0] / rows, img_shape[1] / cols
    every = max(1, int(math.ceil(max(rows, cols) / 16.0)))
    ax.set_xticks([(c + 0.5) * pw - 0.5 for c in range(0, cols, every)])
    ax.set_xticklabels([str(c) for c in range(0, cols, every)], fontsize=7)
    ax.set_yticks([(r + 0.5) * ph - 0.5 for r in range(0, rows, every)])
    ax.set_yticklabels([str(r) for r in range(0, rows, every)], fontsize=7)
    ax.tick_params(length=2, pad=1)
    ax.set_xlabel("patch column", fontsize=8)
    ax.set_ylabel("patch row", fontsize=8)


def _query_row(attn2d, query, grid, prefix):
    """Return ``(weights over patches, label, (row, col) or None)`` for one query."""
    if query is None or (isinstance(query, str) and query.lower() == "cls"):
        if prefix == 0:
            raise VisualizerValueError(
                "query='cls' needs a CLS token, but the attention has {} tokens and a {}x{} grid, "
                "so no prefix tokens: pass a patch index or (row, col) as query".format(
                    attn2d.shape[1], grid[0], grid[1])
            )
        return attn2d[0, prefix:], "CLS", None
    if isinstance(query, str):
        raise VisualizerValueError(
            "unknown query {!r}: use 'cls', a patch index or a (row, col) pair".format(query)
        )
    r, c = _patch_rc(query, grid, "query")
    return attn2d[prefix + r * grid[1] + c, prefix:], "patch ({}, {})".format(r, c), (r, c)


def _overlay(fig, ax, img, weights, grid, query_rc, title, cmap, alpha, upsample, colorbar, mark_color,
             vmax=None):
    """Draw the image and the weights over it in ``cmap``, each pixel as opaque as its weight.

    The opacity rises with the weight (up to ``alpha``), so the image stays
    visible where attention is low and the strongest patches show nearly the
    colour bar's own colour; a uniform half-transparent layer tinted every
    pixel and matched no colour of the bar.
    """
    import numpy as np
    from matplotlib.cm import ScalarMappable

    total = float(weights.sum())
    if total <= 0:
        raise VisualizerValueError(
            "the query gives the patches no attention (sum {:.3g}): nothing to draw; "
            "pick another query or head".format(total)
        )
    patch_map = (weights / total).reshape(grid)
    heat = _upsample(patch_map, img.shape[0], img.shape[1], upsample)
    top = float(patch_map.max()) if vmax is None else float(vmax)
    ax.imshow(img, interpolation="nearest")
    im = ax.imshow(heat, cmap=cmap, alpha=alpha * np.clip(heat / (top or 1.0), 0.0, 1.0),
                   vmin=0.0, vmax=top, interpolation="nearest")
    if query_rc is not None:
        x0, y0, w, h = _patch_box(query_rc[0], query_rc[1], grid, img.shape)
        ax.add_patch(Rectangle((x0, y0), w, h, fill=False, edgecolor=mark_color, linewidth=2.0))
    _patch_ticks(ax, grid, img.shape)
    ax.set_title(title)
    if colorbar:
        cb = fig.colorbar(ScalarMappable(norm=im.norm, cmap=im.cmap), ax=ax, shrink=0.85)
        cb.set_label("share of attention over patches")
    return fig


def plot_query_on_image(
    attn: Any,
    image: Any,
    query: Union[str, PatchLike, None] = "cls",
    grid: Optional[GridLike] = None,
    *,
    num_prefix_tokens: Optional[int] = None,
    head: Optional[int] = None,
    sample: int = 0,
    upsample: str = "nearest",
    cmap: str = "inferno",
    alpha: float = 0.85,
    colorbar: bool = True,
    mark_color: str = "cyan",
    title: Optional[str] = None,
    ax: Any = None,
    figsize: Tuple[float, float] = (5.5, 4.6),
    vmax: Optional[float] = None,
) -> Figure:
    """Overlay one query's attention over the image patches on the image the model saw.

    ``query`` is ``'cls'`` (the row of token 0, the CLS token), a patch index
    (row-major, counting patches only, not prefix tokens) or a ``(row, col)``
    pair; a patch query is outlined in ``mark_color``.  ``head=None`` uses the
    mean over heads.  The row is cut to the patch tokens and renormalised to
    sum to 1 over the patches; colours run from 0 to the largest patch weight
    (or ``vmax``: one scale for several figures), drawn in ``cmap`` over the
    image, each pixel as opaque as its weight (up to ``alpha``).
    ``upsample='nearest'`` paints each patch's weight on its whole pixel box;
    ``'bilinear'`` smooths between patch centres.

    The grid is inferred when not given: the smallest number of prefix tokens
    (0, 1 for CLS, ... up to 16) that leaves a square number of patches, unless
    ``num_prefix_tokens`` says.  ``image`` must be the model input (see
    :func:`model_input_image`); a warning says when its size does not split
    into the grid.

    >>> import numpy as np
    >>> attn = np.full((2, 5, 5), 0.2)     # 2 heads, CLS + 2x2 patches
    >>> fig = plot_query_on_image(attn, np.zeros((32, 32, 3)), query=(1, 0))
    >>> fig.axes[0].images[1].get_array().shape
    (32, 32)
    """
    arr = sample_maps(attn, sample, square=False)
    (rows, cols), prefix = patch_grid(arr.shape[-1], grid, num_prefix_tokens)
    attn2d = _select_head(arr, head)
    if attn2d.shape[0] != attn2d.shape[1] and query not in (None, "cls", "CLS"):
        # Cross attention: a patch query only makes sense when queries are the same tokens.
        raise VisualizerValueError(
            "a patch query needs self-attention of shape (heads, N, N), got shape {}".format(tuple(arr.shape))
        )
    weights, label, rc = _query_row(attn2d, query, (rows, cols), prefix)
    img = _image_array(image)
    _check_alignment(img, (rows, cols))
    fig, ax = _figure_and_axes(ax, figsize)
    if title is None:
        title = "attention of {} ({})".format(label, "mean of heads" if head is None else "head {}".format(head))
    return _overlay(fig, ax, img, weights, (rows, cols), rc, title, cmap, alpha, upsample, colorbar, mark_color,
                    vmax)


def plot_highlighted_patches(
    image: Any,
    patches: Sequence[PatchLike],
    grid: GridLike,
    *,
    color: str = "red",
    linewidth: float = 2.0,
    labels: bool = False,
    title: Optional[str] = None,
    ax: Any = None,
    figsize: Tuple[float, float] = (4.6, 4.6),
) -> Figure:
    """Draw rectangles around the given patches of the image.

    ``patches`` holds patch indices (row-major) or ``(row, col)`` pairs on a
    ``grid`` of ``rows x cols`` (an int means square).  With ``labels`` each
    box gets its patch index.  The image is drawn as given, so pass the model
    input (:func:`model_input_image`).

    >>> import numpy as np
    >>> fig = plot_highlighted_patches(np.zeros((64, 64, 3)), [0, (3, 3)], grid=4)
    >>> len(fig.axes[0].patches)
    2
    """
    rows, cols = parse_grid(grid)
    img = _image_array(image)
    _check_alignment(img, (rows, cols))
    if isinstance(patches, (int, np.integer)):
        patches = [patches]
    fig, ax = _figure_and_axes(ax, figsize)
    ax.imshow(img, interpolation="nearest")
    for patch in patches:
        r, c = _patch_rc(patch, (rows, cols))
        x0, y0, w, h = _patch_box(r, c, (rows, cols), img.shape)
        ax.add_patch(Rectangle((x0, y0), w, h, fill=False, edgecolor=color, linewidth=linewidth))
        if labels:
            # a pale box behind the number keeps it readable on any photo
            ax.text(x0 + w / 2, y0 + h / 2, str(r * cols + c), color=color,
                    ha="center", va="center", fontsize=7,
                    bbox=dict(facecolor="white", alpha=0.75, edgecolor="none", pad=1.0))
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    return fig


def plot_token_attention(
    attn: Any,
    tokens: Sequence[Any],
    head: Optional[int] = None,
    sample: int = 0,
    *,
    max_tokens: Optional[int] = 100,
    fontsize: Optional[float] = None,
    cmap: str = "viridis",
    title: Optional[str] = None,
    ax: Any = None,
    vmax: Optional[float] = None,
) -> Figure:
    """Draw a token-to-token attention heatmap with the tokens as labels on both axes.

    Rows are queries, columns keys.  ``head=None`` draws the mean over heads.
    For long inputs the figure grows (up to 18 inches) and the label font
    shrinks with the number of tokens (``fontsize`` overrides it); beyond
    ``max_tokens`` only the first ``max_tokens`` queries and keys are drawn,
    not renormalised, and the title says so (``max_tokens=None`` draws all).
    The colour scale runs from 0 to ``vmax`` (default: the map's maximum); pass
    one ``vmax`` to every layer's figure to compare them.

    >>> import numpy as np
    >>> fig = plot_token_attention(np.full((2, 3, 3), 1 / 3), ["[CLS]", "hi", "[SEP]"])
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['[CLS]', 'hi', '[SEP]']
    """
    arr = sample_maps(attn, sample, square=True)
    n = arr.shape[-1]
    if isinstance(tokens, str):
        raise VisualizerTypeError(
            "expected tokens as a list of strings, got one string {!r}: pass "
            "tokenizer.convert_ids_to_tokens(ids)".format(tokens[:40])
        )
    tokens = [str(t) for t in tokens]
    if len(tokens) != n:
        raise VisualizerValueError(
            "got {} tokens for attention over {} tokens (shape {}): pass one token per "
            "position, padding included".format(len(tokens), n, tuple(arr.shape))
        )
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise VisualizerValueError(
            "max_tokens must be a positive integer or None (all tokens), got {!r}".format(
                max_tokens))
    data = _select_head(arr, head)
    shown = n
    if max_tokens is not None and n > max_tokens:
        shown = int(max_tokens)
        data = data[:shown, :shown]
        tokens = tokens[:shown]
    side = float(np.clip(0.2 * shown + 2.0, 4.0, 18.0))
    if fontsize is None:
        # about 70% of the height of one row, in points, between 3 and 10
        fontsize = float(np.clip(0.7 * (side - 1.5) * 72.0 / shown, 3.0, 10.0))
    fig, ax = _figure_and_axes(ax, (side + 1.2, side))
    im = ax.imshow(data, cmap=cmap, interpolation="nearest", aspect="equal", vmin=0.0,
                   vmax=float(data.max()) if vmax is None else float(vmax))
    ax.set_xticks(np.arange(shown))
    ax.set_yticks(np.arange(shown))
    ax.set_xticklabels(tokens, rotation=90, fontsize=fontsize)
    ax.set_yticklabels(tokens, fontsize=fontsize)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title is None:
        title = "mean of {} heads".format(arr.shape[0]) if head is None else "head {}".format(head)
    if shown < n:
        title += "\n(first {} of {} tokens shown; raise max_tokens to see all)".format(shown, n)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8).set_label(
        "attention weight" + ("" if vmax is None else " (scale shared with other figures)"))
    return fig


# ---------------------------------------------------------------------------
# Rollout
# ---------------------------------------------------------------------------

def _layers(attentions, sample):
    if hasattr(attentions, "shape") or not isinstance(attentions, (list, tuple)):
        raise VisualizerTypeError(
            "expected attentions as a list of per-layer arrays (heads, N, N) in forward order, "
            "got {}: for a stacked (layers, heads, N, N) array pass list(array)".format(
                type(attentions).__name__)
        )
    if not attentions:
        raise VisualizerValueError("expected at least one layer of attention, got an empty list")
    layers = []
    for i, layer in enumerate(attentions):
        layers.append(sample_maps(layer, sample, square=True, what="attention of layer {}".format(i)))
    n = layers[0].shape[-1]
    for i, layer in enumerate(layers):
        if layer.shape[-1] != n:
            raise VisualizerValueError(
                "layer {} has {} tokens but layer 0 has {}: rollout needs every layer of one "
                "forward pass".format(i, layer.shape[-1], n)
            )
    return layers


def attention_rollout(
    attentions: Sequence[Any],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: bool = True,
    sample: int = 0,
) -> np.ndarray:
    """Return the attention rollout of Abnar & Zuidema (2020) as an ``(N, N)`` array.

    ``attentions`` lists each layer's ``(heads, N, N)`` (or
    ``(batch, heads, N, N)``, with ``sample``) in forward order, first layer
    first.  Per layer: the heads are fused (``'mean'``, ``'max'`` or
    ``'min'``); the lowest ``discard_ratio`` of the fused weights (over the
    whole N x N matrix) are set to 0; with ``residual`` the identity is added
    for the skip connection (``0.5 · A + 0.5 · I``); rows are renormalised to
    sum to 1 (see :func:`visualizer.attention.rollout`).  The layers
    are then multiplied as ``rollout = A_L @ ... @ A_2 @ A_1``, so row ``i``
    is how much output token ``i`` of the last layer draws from each input
    token, and every row sums to 1.  The CLS row for a ViT is ``rollout[0]``.

    >>> import numpy as np
    >>> r = attention_rollout([np.full((3, 4, 4), 0.25)] * 2)
    >>> np.allclose(r.sum(axis=1), 1.0)
    True
    """
    return rollout(_layers(attentions, sample), head_fusion, discard_ratio, residual)


def plot_rollout_on_image(
    attentions: Sequence[Any],
    image: Any,
    grid: Optional[GridLike] = None,
    *,
    query: Union[str, PatchLike, None] = "cls",
    num_prefix_tokens: Optional[int] = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: bool = True,
    sample: int = 0,
    upsample: str = "nearest",
    cmap: str = "inferno",
    alpha: float = 0.85,
    colorbar: bool = True,
    mark_color: str = "cyan",
    title: Optional[str] = None,
    ax: Any = None,
    figsize: Tuple[float, float] = (5.5, 4.6),
    vmax: Optional[float] = None,
) -> Figure:
    """Overlay the CLS row of the attention rollout over the patches on the image.

    Computes :func:`attention_rollout` (``head_fusion``, ``discard_ratio``,
    ``residual``) and draws one row of it like :func:`plot_query_on_image`:
    cut to the patch tokens, renormalised to sum to 1 over the patches (with
    the residual, the CLS token's weight on itself is large, so this matters),
    colours from 0 to the maximum.  ``query`` picks another row: a patch index
    or ``(row, col)``.  ``image`` is the model input (:func:`model_input_image`).

    >>> import numpy as np
    >>> layers = [np.full((2, 5, 5), 0.2)] * 3
    >>> fig = plot_rollout_on_image(layers, np.zeros((32, 32, 3)))
    >>> fig.axes[0].get_title()
    'rollout of CLS (mean fusion, 3 layers)'
    """
    rolled = attention_rollout(attentions, head_fusion=head_fusion, discard_ratio=discard_ratio,
                               residual=residual, sample=sample)
    grid_rc, prefix = patch_grid(rolled.shape[-1], grid, num_prefix_tokens)
    weights, label, rc = _query_row(rolled, query, grid_rc, prefix)
    img = _image_array(image)
    _check_alignment(img, grid_rc)
    fig, ax = _figure_and_axes(ax, figsize)
    if title is None:
        title = "rollout of {} ({} fusion, {} layers)".format(label, head_fusion, len(attentions))
    return _overlay(fig, ax, img, weights, grid_rc, rc, title, cmap, alpha, upsample, colorbar, mark_color,
                    vmax)


def save_figure(fig: Figure, path: Union[str, "os.PathLike[str]"], dpi: int = 150, **kwargs: Any) -> str:
    """Write ``fig`` to ``path`` (format from the extension) and return the path.

    Parent directories are created.  Extra keyword arguments go to
    :meth:`matplotlib.figure.Figure.savefig`; ``bbox_inches='tight'`` is the
    default so titles and tick labels are not cut.

    >>> import numpy as np, tempfile, os
    >>> out = save_figure(plot_head(np.eye(3)), os.path.join(tempfile.mkdtemp(), "h.png"))
    >>> os.path.getsize(out) > 0
    True
    """
    if not isinstance(fig, Figure):
        raise VisualizerTypeError(
            "save_figure needs a matplotlib Figure (as the plot functions return), got {} "
            "{!r}".format(type(fig).__name__, fig))
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    formats = fig.canvas.get_supported_filetypes()
    if kwargs.get("format") is None and ext not in formats:
        raise VisualizerValueError(
            "save_figure cannot write {!r}: the extension {!r} is not a format matplotlib "
            "writes ({})".format(path, ext, ", ".join(sorted(formats))))
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    kwargs.setdefault("bbox_inches", "tight")
    fig.savefig(path, dpi=dpi, **kwargs)
    return path


# ===========================================================================
# Generation: attention over a generated continuation.
# Appended as one section; takes the output of visualizer.generation.stitch.
# ===========================================================================

__all__ += ["plot_generation", "plot_generated_tokens"]


def _generation_input(stitched, tokens, prompt_length, sample, head):
    """Return ``(rows (R, T), first row's position, tokens as strings, P)`` for the figures."""
    arr = sample_maps(stitched, sample, square=False, what="stitched attention")
    data = _select_head(arr, head)
    rows, length = data.shape
    if rows > length:
        raise VisualizerValueError(
            "stitched attention has {} rows over {} keys; expected the (T, T) matrix of "
            "visualizer.generation.stitch, or its last rows (a row-only capture)".format(
                rows, length))
    if isinstance(tokens, str):
        raise VisualizerTypeError(
            "expected tokens as a list of strings, got one string {!r}: pass "
            "tokenizer.convert_ids_to_tokens(sequence)".format(tokens[:40]))
    tokens = [str(t) for t in tokens]
    if len(tokens) not in (length, length + 1):
        raise VisualizerValueError(
            "got {} tokens for attention over {} positions: pass the final sequence's tokens "
            "({} with the last generated token, or {} without)".format(
                len(tokens), length, length + 1, length))
    if isinstance(prompt_length, bool) or not isinstance(prompt_length, (int, np.integer)) \
            or not 1 <= prompt_length <= length:
        raise VisualizerValueError(
            "prompt_length must be an int between 1 and {} (the stitched length), got "
            "{!r}".format(length, prompt_length))
    first = length - rows
    if first > prompt_length - 1:
        raise VisualizerValueError(
            "the stitched attention holds the rows of positions {}..{}, but with "
            "prompt_length={} the first generated token comes from row {}".format(
                first, length - 1, prompt_length, prompt_length - 1))
    return data, first, tokens, int(prompt_length)


def _shown(token):
    """A token as drawn: whitespace made visible, never empty."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return text if text.strip() else "\u2423" * max(1, len(text))


def plot_generation(
    stitched: Any,
    tokens: Sequence[Any],
    prompt_length: int,
    head: Optional[int] = None,
    sample: int = 0,
    *,
    max_tokens: Optional[int] = 100,
    cmap: str = "viridis",
    title: Optional[str] = None,
    ax: Any = None,
) -> Figure:
    """Draw the stitched attention of a generation with prompt and generated tokens as labels.

    ``stitched`` is what :func:`visualizer.generation.stitch` returns:
    ``(B, H, T, T)`` (or one sample's ``(H, T, T)``), or its last rows for a
    row-only capture (``queries=-1``).  ``tokens`` are the final sequence's
    tokens (``T`` or ``T + 1``; the last generated token is never a query).
    Rows are queries, columns keys; row ``t`` is the attention with which
    token ``t + 1`` was generated.  Generated tokens are labelled in red and
    set apart from the prompt by white lines.  ``head=None`` draws the mean
    over heads; beyond ``max_tokens`` only the last ``max_tokens`` positions
    are drawn (the title says so).

    >>> import numpy as np
    >>> from visualizer.generation import stitch
    >>> m = stitch([np.full((1, 1, 2, 2), 0.5) * np.tri(2), np.full((1, 1, 1, 3), 1 / 3)])
    >>> fig = plot_generation(m, ["a", "b", "c", "d"], prompt_length=2)
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['a', 'b', 'c']
    """
    data, first, tokens, prompt = _generation_input(stitched, tokens, prompt_length, sample, head)
    rows, length = data.shape
    heads = sample_maps(stitched, sample, square=False).shape[0]
    start = 0
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise VisualizerValueError(
                "max_tokens must be a positive integer or None (all tokens), got {!r}".format(
                    max_tokens))
        start = max(0, length - max_tokens)
    keys = list(range(start, length))
    queries = list(range(max(first, start), length))
    data = data[queries[0] - first:, start:]
    side = float(np.clip(0.2 * len(keys) + 2.0, 4.0, 18.0))
    fontsize = float(np.clip(0.7 * (side - 1.5) * 72.0 / len(keys), 3.0, 10.0))
    height = float(np.clip(side * len(queries) / len(keys) + 1.5, 2.5, 18.0))
    fig, ax = _figure_and_axes(ax, (side + 1.2, height))
    im = ax.imshow(data, cmap=cmap, interpolation="nearest", aspect="equal")
    ax.set_xticks(np.arange(len(keys)))
    ax.set_yticks(np.arange(len(queries)))
    ax.set_xticklabels([_shown(tokens[k]) for k in keys], rotation=90, fontsize=fontsize)
    ax.set_yticklabels([_shown(tokens[q]) for q in queries], fontsize=fontsize)
    for labels, positions in ((ax.get_xticklabels(), keys), (ax.get_yticklabels(), queries)):
        for label, position in zip(labels, positions):
            if position >= prompt:
                label.set_color("tab:red")
    if start < prompt:
        ax.axvline(prompt - start - 0.5, color="white", linewidth=1.0)
    if queries[0] < prompt:
        ax.axhline(prompt - queries[0] - 0.5, color="white", linewidth=1.0)
    ax.set_xlabel("key (prompt, then generated in red)")
    ax.set_ylabel("query")
    if title is None:
        title = "{} prompt + {} generated tokens, {}".format(
            prompt, len(tokens) - prompt, "mean of {} heads".format(heads) if head is None
            else "head {}".format(head))
    if start > 0:
        title += "\n(last {} of {} positions shown; raise max_tokens to see all)".format(
            len(keys), length)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def plot_generated_tokens(
    stitched: Any,
    tokens: Sequence[Any],
    prompt_length: int,
    head: Optional[int] = None,
    sample: int = 0,
    *,
    max_steps: Optional[int] = 32,
    cmap: str = "Reds",
    title: Optional[str] = None,
) -> Figure:
    """Draw one strip per generated token: the text so far, each token coloured by its weight.

    Strip ``i`` shows, for the ``i``-th generated token (named on the left),
    the row that produced it: the attention of the position before it over
    every token up to there.  Colours are the weight divided by that strip's
    largest weight (so each strip uses the whole scale; the largest weight is
    printed on the right).  ``stitched`` and ``tokens`` are as for
    :func:`plot_generation`, except that ``tokens`` must be the whole final
    sequence (``T + 1`` tokens, the last generated one included).  Only the
    first ``max_steps`` generated tokens get a strip (the title says so).

    >>> import numpy as np
    >>> from visualizer.generation import stitch
    >>> m = stitch([np.full((1, 1, 2, 2), 0.5) * np.tri(2), np.full((1, 1, 1, 3), 1 / 3)])
    >>> fig = plot_generated_tokens(m, ["a", "b", "c", "d"], prompt_length=2)
    >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
    ['\u2192 c', '\u2192 d']
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    data, first, tokens, prompt = _generation_input(stitched, tokens, prompt_length, sample, head)
    rows, length = data.shape
    if len(tokens) != length + 1:
        raise VisualizerValueError(
            "got {} tokens; the strips need the whole final sequence, {} tokens (the last "
            "generated token included)".format(len(tokens), length + 1))
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < 1):
        raise VisualizerValueError(
            "max_steps must be a positive integer or None (all), got {!r}".format(max_steps))
    generated = list(range(prompt, length + 1))  # positions of generated tokens
    shown = generated if max_steps is None else generated[:max_steps]
    widths = [len(_shown(t)) + 1 for t in tokens[:length]]
    edges = np.concatenate([[0], np.cumsum(widths)])
    total = float(edges[max(shown)])  # the longest strip: the text before the last token shown
    width = float(np.clip(0.075 * total + 2.0, 6.0, 20.0))
    fontsize = float(np.clip(120.0 * (width - 2.0) / max(total, 1.0), 3.0, 10.0))
    height = float(np.clip(len(shown) * 0.3 * max(fontsize, 6.0) / 8.0 + 1.2, 2.0, 20.0))
    fig = _new_figure((width, height))
    ax = fig.add_subplot(1, 1, 1)
    colours = colormaps[cmap] if hasattr(colormaps, "__getitem__") else None
    if colours is None:  # pragma: no cover - matplotlib < 3.5
        from matplotlib import cm
        colours = cm.get_cmap(cmap)
    for y, position in enumerate(shown):
        row = data[position - 1 - first, :position]
        peak = float(row.max()) if row.size else 0.0
        for k in range(position):
            weight = row[k] / peak if peak > 0 else 0.0
            ax.add_patch(Rectangle((edges[k], y - 0.42), widths[k] - 0.15, 0.84,
                                   facecolor=colours(weight), edgecolor="none"))
            ax.text(edges[k] + (widths[k] - 0.15) / 2, y, _shown(tokens[k]), ha="center",
                    va="center", fontsize=fontsize, family="monospace",
                    color="white" if weight > 0.6 else "black",
                    fontweight="bold" if k >= prompt else "normal")
        ax.text(edges[position] + 0.5, y, "max {:.2f}".format(peak), va="center",
                fontsize=max(fontsize - 1, 3.0), color="0.4")
    ax.set_xlim(0, total + 8)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    ax.set_yticks(np.arange(len(shown)))
    ax.set_yticklabels(["\u2192 " + _shown(tokens[p]) for p in shown],
                       fontsize=max(fontsize, 6.0), color="tab:red")
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    if title is None:
        heads = sample_maps(stitched, sample, square=False).shape[0]
        title = "what each generated token attended to ({}; bold: generated)".format(
            "mean of {} heads".format(heads) if head is None else "head {}".format(head))
    if len(shown) < len(generated):
        title += "\n(first {} of {} generated tokens; raise max_steps to see all)".format(
            len(shown), len(generated))
    ax.set_title(title, fontsize=10)
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=colours), ax=ax, shrink=0.8,
                 label="weight / strip's largest")
    return fig


def _generation_figures(stitched, steps, sample=0, limit=0, title=""):
    """Draw each layer's generation and the last layer's generated positions; return both.

    ``stitched`` holds one :func:`visualizer.generation.stitch` result per
    layer, each stitched from ``steps`` maps (the prompt step included).
    Positions stand in for tokens, which a saved file does not hold.  Returns
    ``(figures of the first limit layers (0: all), the generated-tokens figure)``;
    titles start with ``title``.  ``visualizer plot`` draws generations with it.
    """
    length = stitched[0].shape[-1]
    prompt = length - steps + 1
    labels = [str(i) for i in range(length + 1)]
    count = len(stitched) if limit == 0 else min(limit, len(stitched))
    per_layer = [
        plot_generation(stitched[i], labels, prompt, sample=sample,
                        title="{}: layer {} of {}, {} prompt + {} generated positions".format(
                            title, i + 1, len(stitched), prompt, length + 1 - prompt))
        for i in range(count)]
    last = plot_generated_tokens(stitched[-1], labels, prompt, sample=sample,
                                 title="{}: last layer, what each generated position "
                                       "attended to".format(title))
    return per_layer, last


# ===========================================================================
# Relevance: what made the prediction (issue 22).
# Appended as one section; draws the results of visualizer.attribution.
# ===========================================================================

__all__ += ["plot_relevance_on_image", "plot_relevance_maps", "plot_token_relevance"]


def _relevance_weights(relevance, query, grid, num_prefix_tokens, sample, what):
    """``(weights over the patches, query label, query (row, col) or None, grid, prefix)``.

    ``relevance`` is a vector over the tokens (``(T,)``), a relevance matrix
    ``(T, T)`` whose row ``query`` is drawn, or a batch of them ``(B, T, T)``.
    """
    arr = as_array(relevance, what)
    if arr.ndim == 3:
        if not -arr.shape[0] <= sample < arr.shape[0]:
            raise VisualizerValueError(
                "sample={} is out of range for {} of shape {}: pass sample between 0 and "
                "{}".format(sample, what, arr.shape, arr.shape[0] - 1))
        arr = arr[sample]
    if arr.ndim not in (1, 2) or (arr.ndim == 2 and arr.shape[0] != arr.shape[1]):
        raise VisualizerValueError(
            "expected {} as a vector over the tokens (T,), a relevance matrix (T, T) or a "
            "batch of them (B, T, T), got shape {}".format(what, tuple(arr.shape)))
    if not np.all(np.isfinite(arr)):
        raise VisualizerValueError("{} contains NaN or inf".format(what))
    grid_rc, prefix = patch_grid(arr.shape[-1], grid, num_prefix_tokens)
    if arr.ndim == 1:
        return arr[prefix:], "the tokens", None, grid_rc, prefix
    weights, label, rc = _query_row(arr, query, grid_rc, prefix)
    return weights, label, rc, grid_rc, prefix


def plot_relevance_on_image(
    relevance: Any,
    image: Any,
    grid: Optional[GridLike] = None,
    *,
    query: Union[str, PatchLike, None] = "cls",
    num_prefix_tokens: Optional[int] = None,
    sample: int = 0,
    upsample: str = "nearest",
    cmap: str = "jet",
    alpha: float = 0.5,
    colorbar: bool = True,
    mark_color: str = "white",
    title: Optional[str] = None,
    ax: Any = None,
    figsize: Tuple[float, float] = (5.5, 4.6),
) -> Figure:
    """Overlay the relevance of the image patches for one output on the image the model saw.

    ``relevance`` is what :mod:`visualizer.attribution` returns: a relevance
    matrix ``(T, T)`` or a batch ``(B, T, T)`` (``sample`` picks one), whose
    row ``query`` is drawn (``'cls'``: a ViT's class decision, ``R[0, 1:]``;
    or a patch index or ``(row, col)``), or a vector over the ``T`` tokens.
    As in :func:`plot_query_on_image`, the prefix tokens are dropped and the
    patches' share is coloured from 0 to its largest; the grid is inferred
    unless given.  ``image`` is the model input (:func:`model_input_image`).

    >>> import numpy as np
    >>> r = np.eye(5) + np.full((5, 5), 0.1)      # CLS + 2x2 patches
    >>> fig = plot_relevance_on_image(r, np.zeros((32, 32, 3)))
    >>> fig.axes[0].get_title()
    'relevance for CLS'
    """
    weights, label, rc, grid_rc, _ = _relevance_weights(
        relevance, query, grid, num_prefix_tokens, sample, "relevance")
    if float(weights.sum()) <= 0:
        raise VisualizerValueError(
            "no patch has any relevance for {} (all {} values are 0 or less): was the score "
            "back-propagated before the maps were read, and does it depend on this "
            "output?".format(label, weights.size))
    img = _image_array(image)
    _check_alignment(img, grid_rc)
    fig, ax = _figure_and_axes(ax, figsize)
    if title is None:
        title = "relevance for {}".format(label)
    _overlay(fig, ax, img, weights, grid_rc, rc, title, cmap, alpha, upsample, colorbar,
             mark_color)
    if colorbar and ax.images[-1].colorbar is not None:
        ax.images[-1].colorbar.set_label("share over the patches")
    return fig


def plot_relevance_maps(
    maps: Mapping[str, Any],
    image: Any,
    grid: Optional[GridLike] = None,
    *,
    query: Union[str, PatchLike, None] = "cls",
    num_prefix_tokens: Optional[int] = None,
    sample: int = 0,
    upsample: str = "nearest",
    cmap: str = "jet",
    alpha: float = 0.5,
    title: Optional[str] = None,
    show_image: bool = True,
    panel_size: float = 3.2,
) -> Figure:
    """Draw several explanations of one output side by side, each over the image.

    ``maps`` maps a name (``'relevance'``, ``'rollout'``, ``'raw attention'``)
    to what :func:`plot_relevance_on_image` takes: a matrix ``(T, T)``, a
    batch ``(B, T, T)`` or a vector over the tokens (the CLS row of a layer's
    attention, say).  Each panel is coloured from 0 to its own largest share.
    ``show_image`` puts the image alone first, to compare the overlays with.

    >>> import numpy as np
    >>> r = np.eye(5) + 0.1
    >>> fig = plot_relevance_maps({"relevance": r, "rollout": r}, np.zeros((32, 32, 3)))
    >>> [ax.get_title() for ax in fig.axes if ax.images]
    ['the image', 'relevance', 'rollout']
    """
    if not isinstance(maps, Mapping) or not maps:
        raise VisualizerTypeError(
            "expected maps as a non-empty dict from a name to a relevance matrix or a vector "
            "over the tokens, got {}".format(type(maps).__name__))
    panels = len(maps) + bool(show_image)
    fig = _new_figure((panel_size * panels + 0.4, panel_size + 0.7))
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    if show_image:
        ax = axes.pop(0)
        ax.imshow(_image_array(image), interpolation="nearest")
        ax.set_title("the image")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax, (name, value) in zip(axes, maps.items()):
        plot_relevance_on_image(value, image, grid, query=query,
                                num_prefix_tokens=num_prefix_tokens, sample=sample,
                                upsample=upsample, cmap=cmap, alpha=alpha, colorbar=False,
                                title=str(name), ax=ax)
        ax.set_xlabel("")
        ax.set_ylabel("")
    if title is not None:
        fig.suptitle(title)
    return fig


def plot_token_relevance(
    relevance: Any,
    tokens: Sequence[Any],
    labels: Optional[Sequence[str]] = None,
    *,
    cmap: str = "Reds",
    title: Optional[str] = None,
    ax: Any = None,
    max_tokens: Optional[int] = 100,
) -> Figure:
    """Draw the relevance of each token as a strip of coloured cells under the tokens.

    ``relevance`` is a vector over the ``T`` tokens, or ``(K, T)``: one strip
    per explained output (``labels`` names them), e.g. ``R[0, 0]`` of
    :func:`visualizer.attribution.relevance` for BERT's CLS, ``R[0, -1]`` for
    a decoder's next token.  Each strip is coloured from 0 to its own
    largest value; beyond ``max_tokens`` tokens only the first are drawn and
    the title says so.

    >>> import numpy as np
    >>> fig = plot_token_relevance(np.array([0.1, 0.7, 0.2]), ["[CLS]", "hi", "[SEP]"])
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['[CLS]', 'hi', '[SEP]']
    """
    arr = as_array(relevance, "relevance")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.size == 0:
        raise VisualizerValueError(
            "expected relevance as a vector over the tokens (T,) or strips (K, T), got shape "
            "{}: for a relevance matrix R pick a row, e.g. R[0, 0]".format(tuple(arr.shape)))
    if isinstance(tokens, str):
        raise VisualizerTypeError(
            "expected tokens as a list of strings, got one string {!r}: pass "
            "tokenizer.convert_ids_to_tokens(ids)".format(tokens[:40]))
    tokens = [str(t) for t in tokens]
    if len(tokens) != arr.shape[1]:
        raise VisualizerValueError(
            "got {} tokens for relevance over {} tokens: pass one token per position".format(
                len(tokens), arr.shape[1]))
    if labels is not None and len(labels) != arr.shape[0]:
        raise VisualizerValueError(
            "got {} labels for {} strips: pass one label per row of relevance".format(
                len(labels), arr.shape[0]))
    n = shown = arr.shape[1]
    if max_tokens is not None and n > max_tokens:
        shown = int(max_tokens)
        arr, tokens = arr[:, :shown], tokens[:shown]
    top = np.max(np.where(arr > 0, arr, 0), axis=1, keepdims=True)
    scaled = np.where(top > 0, np.clip(arr, 0, None) / np.where(top > 0, top, 1), 0.0)
    width = float(np.clip(0.28 * shown + 2.2, 4.0, 18.0))
    fig, ax = _figure_and_axes(ax, (width, 1.3 + 0.45 * arr.shape[0]))
    im = ax.imshow(scaled, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(np.arange(shown))
    ax.set_xticklabels(tokens, rotation=90, fontsize=float(np.clip(500.0 / shown, 6, 10)))
    ax.set_yticks(np.arange(arr.shape[0]))
    ax.set_yticklabels([str(label) for label in labels] if labels is not None else
                       [""] * arr.shape[0], fontsize=9)
    ax.tick_params(length=0)
    if title is None:
        title = "relevance of each token"
    if shown < n:
        title += " (first {} of {} tokens shown)".format(shown, n)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.9, pad=0.01).set_label("/ strip's largest", fontsize=8)
    return fig
