"""Save a cache to one ``.npz`` file and load it back, without pickle.

The file is an ordinary NumPy ``.npz`` archive: one array per captured value,
named ``'<key number>/<value number>'``, plus ``'__visualizer__'``: a JSON
manifest (format name, version, keys in order, value counts and, for values
that were Python numbers, that fact) stored as a byte array.  It is read with
``allow_pickle=False``, so loading a file can never run code.
"""
import json
import numbers
import os
import zipfile
import zlib

from ._errors import VisualizerTypeError, VisualizerValueError

FORMAT = "visualizer-cache"
VERSION = 1
MANIFEST = "__visualizer__"


def save_cache(cache, path):
    """Write ``cache`` (a dict of lists of arrays or numbers) to ``path``."""
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
    arrays[MANIFEST] = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


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
