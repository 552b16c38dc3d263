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
from ..attention import to_numpy
from ._disk import check_path

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
    check_path(path, "save")
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
    arrays[MANIFEST] = _json_array(np, manifest)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def save_manifest(path, manifest):
    """Write an ``.npz`` that holds only ``manifest`` (JSON data) as its ``__visualizer__`` entry.

    The manifest of a run's ranks is such a file: any reader of caches opens
    it and tells it apart by its ``format``; :func:`read_manifest` reads it
    back.
    """
    import numpy as np

    with open(path, "wb") as fh:
        np.savez(fh, **{MANIFEST: _json_array(np, manifest)})


def read_manifest(path):
    """Return the JSON data of ``path``'s ``__visualizer__`` entry, or None if it has none.

    Reads that entry only (not the values), and never raises for a file that
    is not ours: None means "some other file", which :func:`load_cache`
    explains.
    """
    try:
        if not os.path.isfile(path) or not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            if MANIFEST + ".npy" not in archive.namelist():
                return None
            import numpy as np

            with archive.open(MANIFEST + ".npy") as fh:
                data = np.lib.format.read_array(fh, allow_pickle=False)
        return json.loads(data.tobytes().decode("utf-8"))
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error, UnicodeDecodeError):
        return None


def _json_array(np, data):
    # JSON as bytes in a uint8 array: numpy reads it back with allow_pickle=False.
    return np.frombuffer(json.dumps(data).encode("utf-8"), dtype=np.uint8)


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
    """Return the context saved with the cache at ``path``; ``{}`` for files without one.

    A file that is not a cache is refused with :func:`load_cache`'s errors;
    the captured values themselves are not read.
    """
    archive, manifest = _open(path)
    with archive:
        try:
            saved = manifest.get("context") or {}
            context = dict(saved.get("values", {}))
            for name in saved.get("arrays", ()):
                context[name] = archive[CONTEXT + name]
        except _DAMAGE as exc:
            raise _damaged(path, exc) from None
    return context


def _as_array(np, key, i, value):
    value = to_numpy(value)  # a tensor kept with store='tensor'
    try:
        return np.asarray(value)
    except Exception as exc:
        raise VisualizerTypeError(
            "cache[{!r}][{}] ({}) cannot be turned into an array: {}".format(
                key, i, type(value).__name__, exc)) from None


def load_cache(path):
    """Read a file written by ``save_cache``; return ``{key: [values...]}`` in order."""
    archive, manifest = _open(path)
    with archive:
        try:
            cache = {}
            for k, entry in enumerate(manifest["keys"]):
                scalars = set(entry.get("python_scalars", ()))
                values = []
                for i in range(entry["count"]):
                    array = archive["{}/{}".format(k, i)]
                    values.append(array.item() if i in scalars else array)
                cache[entry["key"]] = values
        except _DAMAGE as exc:
            raise _damaged(path, exc) from None
    return cache


# What a damaged archive or manifest raises, from numpy, zipfile, zlib or json.
_DAMAGE = (KeyError, ValueError, TypeError, AttributeError, OSError, EOFError,
           zipfile.BadZipFile, zlib.error, UnicodeDecodeError)


def _damaged(path, exc):
    return VisualizerValueError(
        "{} looks like a visualizer cache but is damaged: {}".format(path, exc))


def _open(path):
    """Return ``(open archive, manifest)`` of the cache at ``path``; refuse any other file."""
    import numpy as np

    check_path(path, "load")
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
            "{} is not a cache saved by visualizer: it is a single NumPy array (.npy); "
            "pass a file written by get_local.save".format(path))
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
    try:
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
        except _DAMAGE as exc:
            raise _damaged(path, exc) from None
    except BaseException:
        archive.close()
        raise
    return archive, manifest
