"""Turn attention arrays into the compact data a page embeds: pooled, quantised, base64.

Pure NumPy, no torch, no HTML.  A page's maps are ``(layers, heads, n, n)``
float32 arrays; they are written either as float32 (exact) or as 8-bit codes
with one float32 scale per row (``value = code / 255 * row_max``, an error of
at most ``row_max / 510``), base64-encoded so that they travel inside JSON.
When even the 8-bit codes exceed a page's byte budget, tokens are pooled in
blocks (queries averaged, keys summed, so every pooled row still sums to what
the original rows summed to) until they fit: consecutive blocks of ``b``
tokens for text, ``b x b`` squares of patches for images, prefix tokens (CLS,
registers) kept apart.  The page says so in its header.
"""
import base64
import collections.abc
import struct
import zlib

import numpy as np

from ..._errors import VisualizerTypeError, VisualizerValueError
from ...attention import sample_maps, to_numpy

# Below this many bytes of float32 maps a page keeps them exact.
EXACT_BYTES = 4 * 2 ** 20
# Default budget for the 8-bit maps of one page (before base64, which adds a third).
MAX_BYTES = 24 * 2 ** 20

PRECISIONS = ("auto", "float32", "uint8")


def b64(array):
    """Return the bytes of ``array`` (C order, little-endian) as base64 text."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return base64.b64encode(array.tobytes()).decode("ascii")


def stack_layers(attentions, sample=0):
    """Return ``(labels, maps)``: layer names and a ``(layers, heads, n, n)`` float32 array.

    ``attentions`` is one array (one layer), a list of per-layer arrays in
    forward order, or a mapping from layer name to an array or to a list of
    captured values, as ``get_local.by_module`` returns.  A list of several
    values gives one layer per value, named ``'<name> call <i>'``: a cache
    keyed by function (``{'BertSelfAttention.forward': [6 calls]}``) holds
    one call per layer, and dropping all but the first would hide them.
    """
    if isinstance(attentions, dict) or hasattr(attentions, "keys"):
        labels, values = [], []
        for name, value in attentions.items():
            # a stream's CaptureList is a Sequence too: several calls, like a list
            if isinstance(value, collections.abc.Sequence) and not isinstance(value, str):
                calls = list(value)
                if len(calls) == 1:
                    labels.append(str(name))
                else:
                    labels.extend("{} call {}".format(name, i + 1) for i in range(len(calls)))
                values.extend(calls)
                continue
            labels.append(str(name))
            values.append(value)
        if not values:
            raise VisualizerValueError(
                "the mapping of layers holds no values (every list is empty): capture a "
                "forward pass first")
    elif isinstance(attentions, (list, tuple)):
        if not attentions:
            raise VisualizerValueError("expected at least one layer of attention, got an empty list")
        values = list(attentions)
        labels = ["layer {}".format(i + 1) for i in range(len(values))]
    else:
        values = [attentions]
        labels = ["layer 1"]
    layers = [sample_maps(v, sample, True, "the attention of {}".format(label), np.float32)
              for v, label in zip(values, labels)]
    shapes = {layer.shape for layer in layers}
    if len(shapes) != 1:
        raise VisualizerValueError(
            "every layer must have the same (heads, N, N) shape to share a page, got {}{}".format(
                ", ".join("{}: {}".format(label, tuple(layer.shape))
                          for label, layer in zip(labels, layers)),
                "; calls of one key on inputs of different lengths are different forward "
                "passes: regroup them with get_local.by_module(model, cache) and pass one "
                "pass's values" if any(" call " in label for label in labels) else ""))
    return labels, np.stack(layers)



# ---------------------------------------------------------------------------
# Pooling: the level of detail of large inputs
# ---------------------------------------------------------------------------

def _pool_axis_1d(array, axis, block, mode):
    """Pool ``axis`` in consecutive blocks of ``block``: ``'sum'`` or ``'mean'`` (by count)."""
    n = array.shape[axis]
    groups = -(-n // block)
    pad = groups * block - n
    moved = np.moveaxis(array, axis, -1)
    if pad:
        moved = np.concatenate([moved, np.zeros(moved.shape[:-1] + (pad,), moved.dtype)], -1)
    pooled = moved.reshape(moved.shape[:-1] + (groups, block)).sum(-1)
    if mode == "mean":
        counts = np.full(groups, block, dtype=np.float32)
        counts[-1] = block - pad
        pooled = pooled / counts
    return np.moveaxis(pooled, -1, axis)


def _pool_axis_grid(array, axis, prefix, grid, block, mode):
    """Pool ``axis``: prefix tokens kept, the ``rows x cols`` patches in ``block`` squares."""
    rows, cols = grid
    moved = np.moveaxis(array, axis, -1)
    head, patches = moved[..., :prefix], moved[..., prefix:]
    r2, c2 = -(-rows // block), -(-cols // block)
    pr, pc = r2 * block - rows, c2 * block - cols
    patches = patches.reshape(patches.shape[:-1] + (rows, cols))
    if pr or pc:
        patches = np.pad(patches, [(0, 0)] * (patches.ndim - 2) + [(0, pr), (0, pc)])
    patches = patches.reshape(patches.shape[:-2] + (r2, block, c2, block)).sum((-3, -1))
    if mode == "mean":
        ones = np.zeros((r2 * block, c2 * block), dtype=np.float32)
        ones[:rows, :cols] = 1
        patches = patches / ones.reshape(r2, block, c2, block).sum((1, 3))
    pooled = np.concatenate([head, patches.reshape(patches.shape[:-2] + (r2 * c2,))], -1)
    return np.moveaxis(pooled, -1, axis)


def pool(maps, block, grid=None, prefix=0):
    """Pool the last two axes of ``maps`` (queries averaged, keys summed) by ``block``."""
    if block <= 1:
        return maps
    if grid is None:
        out = _pool_axis_1d(maps, -1, block, "sum")
        return _pool_axis_1d(out, -2, block, "mean").astype(np.float32)
    out = _pool_axis_grid(maps, -1, prefix, grid, block, "sum")
    return _pool_axis_grid(out, -2, prefix, grid, block, "mean").astype(np.float32)


def pooled_size(n, block, grid=None, prefix=0):
    """Number of tokens left after pooling ``n`` tokens by ``block``."""
    if grid is None:
        return -(-n // block)
    return prefix + (-(-grid[0] // block)) * (-(-grid[1] // block))


def choose_block(count, n, max_bytes, grid=None, prefix=0):
    """Smallest block whose 8-bit maps (``count`` maps of n x n) fit in ``max_bytes``."""
    block = 1
    while count * pooled_size(n, block, grid, prefix) ** 2 > max_bytes:
        block += 1
        if pooled_size(n, block, grid, prefix) <= max(prefix, 1) + 1:
            break
    return block


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------

def encode_maps(maps, dtype):
    """Encode ``(..., n, n)`` maps as ``{'dtype', 'shape', 'data'[, 'scales']}``."""
    maps = np.ascontiguousarray(maps, dtype=np.float32)
    shape = [int(s) for s in maps.shape]
    if dtype == "f4":
        return {"dtype": "f4", "shape": shape, "data": b64(maps.astype("<f4"))}
    scales = maps.max(axis=-1).astype(np.float32)
    scales = np.maximum(scales, 0)
    safe = np.where(scales > 0, scales, 1)[..., None]
    codes = np.rint(np.clip(maps, 0, None) / safe * 255).astype(np.uint8)
    return {"dtype": "u8", "shape": shape, "data": b64(codes), "scales": b64(scales.astype("<f4"))}


def decode_maps(encoded):
    """Invert :func:`encode_maps` (the page's JavaScript does the same); for tests."""
    raw = base64.b64decode(encoded["data"])
    shape = tuple(encoded["shape"])
    if encoded["dtype"] == "f4":
        return np.frombuffer(raw, dtype="<f4").reshape(shape)
    scales = np.frombuffer(base64.b64decode(encoded["scales"]), dtype="<f4")
    codes = np.frombuffer(raw, dtype=np.uint8).reshape(shape).astype(np.float32)
    return codes / 255 * scales.reshape(shape[:-1] + (1,))


def pick_dtype(precision, nbytes_f4):
    """``'f4'`` or ``'u8'`` for ``precision`` ('auto', 'float32', 'uint8')."""
    if precision not in PRECISIONS:
        raise VisualizerValueError(
            "unknown precision {!r}: use 'auto' (exact float32 for small pages, 8-bit above "
            "{} MiB), 'float32' or 'uint8'".format(precision, EXACT_BYTES // 2 ** 20))
    if precision == "float32":
        return "f4"
    if precision == "uint8":
        return "u8"
    return "f4" if nbytes_f4 <= EXACT_BYTES else "u8"


def thumbnails(maps, size=40):
    """Block-averaged ``(..., t, t)`` uint8 thumbnails, each scaled to its own maximum."""
    n = maps.shape[-1]
    t = min(n, size)
    edges = np.linspace(0, n, t + 1).astype(int)
    # mean over index blocks; reduceat needs starts
    rows = np.add.reduceat(maps, edges[:-1], axis=-2) / np.diff(edges)[:, None]
    both = np.add.reduceat(rows, edges[:-1], axis=-1) / np.diff(edges)[None, :]
    top = both.max(axis=(-2, -1), keepdims=True)
    top = np.where(top > 0, top, 1)
    return t, np.rint(both / top * 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

def image_uint8(image):
    """Return ``image`` as ``(H, W, 3)`` uint8: from uint8, float in [0, 1], gray or RGBA."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(to_numpy(image))
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3, 4):
        raise VisualizerValueError(
            "expected the image as (height, width, 3), got shape {} (channels first? pass "
            "image.transpose(1, 2, 0))".format(tuple(array.shape)))
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or array.size == 0:
        raise VisualizerValueError(
            "expected the image as (height, width, 3), got shape {}".format(tuple(array.shape)))
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise VisualizerTypeError(
            "expected the image as uint8 in [0, 255] or floats in [0, 1], got dtype {}".format(
                array.dtype))
    array = array.astype(np.float64)
    lo, hi = float(array.min()), float(array.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
        raise VisualizerValueError(
            "expected image values in [0, 1] (or uint8), got range [{:.3g}, {:.3g}]: pass the "
            "unnormalised image the model saw (visualizer.plotting.model_input_image)".format(
                lo, hi))
    return np.rint(np.clip(array, 0, 1) * 255).astype(np.uint8)


def png_data_uri(rgb):
    """Encode an ``(H, W, 3)`` uint8 array as a ``data:image/png;base64,`` URI (stdlib zlib)."""
    height, width = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

    def chunk(kind, payload):
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9))
           + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
