"""Save a cache to one ``.npz`` file and load it back, without pickle.

The file is an ordinary NumPy ``.npz`` archive: one array per captured value,
named ``'<key number>/<value number>'``, plus ``'__visualizer__'``: a JSON
manifest (format name, version, keys in order, value counts and, for values
that were Python numbers, that fact) stored as a byte array.  It is read with
``allow_pickle=False``, so loading a file can never run code.

An optional ``context`` (what a view of the captures needs: token strings,
the image the model saw, the patch grid, layer names, a title) is kept in the
same file: its strings and numbers under the manifest's ``"context"`` entry,
its arrays as entries ``'__context__/<name>'``.  Files written before the
context existed have neither and still load (the format version is still 1);
readers that predate it ignore both.
"""
import json
import numbers
import os
import zipfile
import zlib

from .._errors import VisualizerTypeError, VisualizerValueError

FORMAT = "visualizer-cache"
VERSION = 1
MANIFEST = "__visualizer__"
CONTEXT = "__context__/"


def save_cache(cache, path, context=None):
    """Write ``cache`` (a dict of lists of arrays or numbers) to ``path``, with ``context``.

    ``context`` maps names to JSON values (strings, numbers, lists of them)
    or to NumPy arrays of numbers.
    """
    import numpy as np

    if not isinstance(cache, dict):
        raise VisualizerTypeError(
            "save needs a cache: a dict from key to a list of values, got {}".format(
                type(cache).__name__))
    _check_path(path, "save")
    arrays = {}
    entries = []
    for k, (key, values) in enumerate(cache.items()):
        if not isinstance(key, str):
            raise VisualizerTypeError("cache keys must be strings, got {!r}".format(key))
        if not isinstance(values, (list, tuple)):
            raise VisualizerTypeError(
                "cache[{!r}] must be a list of values, got {}".format(key, type(values).__name__))
        scalars = []
        for i, value in enumerate(values):
            array = _as_array(np, key, i, value)
            if array.dtype.hasobject or array.dtype.kind in "USV":
                raise VisualizerTypeError(
                    "cache[{!r}][{}] is {}, which cannot be saved without pickle; save "
                    "arrays or numbers (transform it, or drop that key first)".format(
                        key, i, type(value).__name__))
            if isinstance(value, numbers.Number) and not isinstance(value, np.generic):
                scalars.append(i)
            arrays["{}/{}".format(k, i)] = array
        entries.append({"key": key, "count": len(values), "python_scalars": scalars})
    manifest = {"format": FORMAT, "version": VERSION, "keys": entries}
    if context:
        manifest["context"], context_arrays = _split_context(np, context)
        arrays.update(context_arrays)
    arrays[MANIFEST] = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _split_context(np, context):
    """Return ``(JSON part, {entry name: array})`` of a context dict."""
    if not isinstance(context, dict):
        raise VisualizerTypeError("context must be a dict, got {}".format(type(context).__name__))
    plain, arrays = {}, {}
    for name, value in context.items():
        if not isinstance(name, str) or "/" in name:
            raise VisualizerTypeError("context names must be strings without '/', got {!r}".format(name))
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject or value.dtype.kind in "USV":
                raise VisualizerTypeError(
                    "context[{!r}] is an array of {}, which cannot be saved without pickle; pass "
                    "strings as a list".format(name, value.dtype))
            arrays[CONTEXT + name] = value
            continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise VisualizerTypeError(
                "context[{!r}] is neither an array nor JSON data (strings, numbers, lists, "
                "dicts): {}".format(name, exc)) from None
        plain[name] = value
    return {"values": plain, "arrays": sorted(n[len(CONTEXT):] for n in arrays)}, arrays


def load_context(path):
    """Return the context saved with the cache at ``path``; ``{}`` for files without one."""
    import numpy as np

    load_cache(path)  # the same checks and errors for a file that is not a cache
    with np.load(path, allow_pickle=False) as archive:
        manifest = json.loads(archive[MANIFEST].tobytes().decode("utf-8"))
        saved = manifest.get("context") or {}
        context = dict(saved.get("values", {}))
        for name in saved.get("arrays", ()):
            context[name] = archive[CONTEXT + name]
    return context


def _check_path(path, verb):
    # An int would be taken by open() as a file descriptor.
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise VisualizerTypeError(
            "{} needs a file path (str or os.PathLike), got {} {!r}".format(
                verb, type(path).__name__, path))


def _as_array(np, key, i, value):
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a tensor kept with store='tensor'
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise VisualizerTypeError(
            "cache[{!r}][{}] ({}) cannot be turned into an array: {}".format(
                key, i, type(value).__name__, exc)) from None


def load_cache(path):
    """Read a file written by ``save_cache``; return ``{key: [values...]}`` in order."""
    import numpy as np

    _check_path(path, "load")
    if os.path.isdir(path):
        raise VisualizerValueError(
            "{} is a directory, not a cache saved by visualizer (not a readable .npz "
            "archive)".format(path))
    with open(path, "rb") as fh:  # a missing file is a FileNotFoundError, as usual
        head = fh.read(6)
        fh.seek(0)
        is_zip = zipfile.is_zipfile(fh)
    if head == b"\x93NUMPY":
        raise VisualizerValueError(
            "{} is a single NumPy array (.npy), not a cache saved by visualizer".format(path))
    if not is_zip:
        # Checked before numpy sees it: numpy would try it as a pickle.
        raise VisualizerValueError(
            "{} is not a cache saved by visualizer (not a readable .npz archive)".format(path))
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise VisualizerValueError(
            "{} is not a cache saved by visualizer (not a readable .npz archive: {})".format(
                path, exc)) from None
    if not hasattr(archive, "files"):
        raise VisualizerValueError(
            "{} is a single NumPy array, not a cache saved by visualizer".format(path))
    with archive:
        if MANIFEST not in archive.files:
            raise VisualizerValueError(
                "{} is an .npz archive but not a cache saved by visualizer (it has no "
                "{!r} entry; its entries are: {})".format(
                    path, MANIFEST, ", ".join(archive.files[:10])))
        try:
            manifest = json.loads(archive[MANIFEST].tobytes().decode("utf-8"))
            if manifest.get("format") != FORMAT:
                raise ValueError("format is {!r}".format(manifest.get("format")))
            if manifest.get("version") != VERSION:
                raise ValueError("version {!r}; this visualizer reads version {}".format(
                    manifest.get("version"), VERSION))
            cache = {}
            for k, entry in enumerate(manifest["keys"]):
                scalars = set(entry.get("python_scalars", ()))
                values = []
                for i in range(entry["count"]):
                    array = archive["{}/{}".format(k, i)]
                    values.append(array.item() if i in scalars else array)
                cache[entry["key"]] = values
        except (KeyError, ValueError, TypeError, AttributeError, OSError, EOFError,
                zipfile.BadZipFile, zlib.error, UnicodeDecodeError) as exc:
            raise VisualizerValueError(
                "{} looks like a visualizer cache but is damaged: {}".format(path, exc)) from None
    return cache
