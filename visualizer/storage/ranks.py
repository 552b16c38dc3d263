"""Files of many processes: one per rank under ``torch.distributed``, loaded merged or per rank.

Under ``torchrun`` (or any launcher that sets ``RANK`` and ``WORLD_SIZE``, or
once ``torch.distributed`` is initialised) every process captures its own
calls, and ``get_local.save('caps.npz')`` writes ``caps.rank<r>.npz`` for
its rank plus ``caps.npz`` itself: a small manifest (an ``.npz`` holding only
``{'format': 'visualizer-ranks', 'world_size': N, 'files': [...]}``), the
same from every rank, written by each (to a temporary name, then renamed,
so a reader never sees half a file).  :func:`load` merges the ranks that
saved (rank 0's calls first in every list) and warns about those that did
not (a process that failed before saving), or gives one rank's.  Every
rank saves the same context (what a view needs), so :func:`load_context`
reads the first rank file there is.

``visualizer.storage`` decides which format a path holds and calls this
module only for a manifest of ranks; a single process saves and loads one
plain ``.npz`` file (``npz``).
"""
import os
import warnings

from .._errors import CaptureWarning, VisualizerValueError
from . import npz as _npz
from ._disk import atomically

FORMAT = "visualizer-ranks"
VERSION = 1


def rank_path(path, rank):
    """Return ``caps.rank3.npz`` for ``caps.npz`` and rank 3 (the extension, if any, stays last)."""
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)
    return "{}.rank{}{}".format(stem, rank, ext)


def save(cache, path, rank, world, context=None):
    """Save this process's ``cache`` as rank ``rank`` of ``world``; return the file written.

    Writes ``rank_path(path, rank)`` and the manifest at ``path`` (the same
    bytes from every rank, so whichever rank writes last, it is whole).
    """
    mine = rank_path(path, rank)
    atomically(mine, lambda tmp: _npz.save_cache(cache, tmp, context=context))
    manifest = {"format": FORMAT, "version": VERSION, "world_size": world,
                "files": [os.path.basename(rank_path(path, r)) for r in range(world)]}
    atomically(os.fspath(path), lambda tmp: _npz.save_manifest(tmp, manifest))
    return mine


def manifest_of(path):
    """Return the manifest of a rank set saved at ``path``, or None for any other file."""
    manifest = _npz.read_manifest(path)
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _files(path, manifest):
    """Return the rank files that ``manifest`` (read from ``path``) lists, as paths."""
    world = manifest.get("world_size")
    files = manifest.get("files")
    if (not isinstance(world, int) or world < 1 or not isinstance(files, list)
            or len(files) != world or not all(isinstance(name, str) for name in files)):
        raise VisualizerValueError(
            "{} looks like a visualizer rank manifest but is damaged (it lists {!r} for "
            "world_size {!r}); save the run again".format(os.fspath(path), files, world))
    folder = os.path.dirname(os.fspath(path))
    return [os.path.join(folder, name) for name in files]


def load(path, manifest, rank=None):
    """Return every rank's captures merged (rank 0's first in each list), or one ``rank``'s.

    ``manifest`` is :func:`manifest_of` ``path``.  Ranks whose file is
    missing are named in a ``CaptureWarning``; if none saved, it is an error.
    """
    files = _files(path, manifest)
    if rank is not None:
        if rank >= len(files):
            raise VisualizerValueError(
                "load({!r}, rank={}): the run had {} processes (ranks 0 to {})".format(
                    os.fspath(path), rank, len(files), len(files) - 1))
        return _npz.load_cache(files[rank])
    present = _present(path, files)
    missing = [r for r, full in enumerate(files) if full not in present]
    if missing:
        names = [os.path.basename(files[r]) for r in missing]
        warnings.warn(
            "{}: rank{} {} of {} saved nothing ({} missing: that process failed before saving, "
            "or has not saved yet); loaded the other ranks".format(
                os.fspath(path), "s" if len(missing) > 1 else "",
                ", ".join(map(str, missing)), len(files), ", ".join(names)),
            CaptureWarning, stacklevel=4)  # load, storage.load, get_local.load, its caller
    merged = {}
    for full in present:
        for key, values in _npz.load_cache(full).items():
            merged.setdefault(key, []).extend(values)
    return merged


def load_context(path, manifest):
    """Return the context of the first rank file there is (every rank saves the same one)."""
    return _npz.load_context(_present(path, _files(path, manifest))[0])


def _present(path, files):
    """Return the rank files that exist; refuse a run where none does."""
    present = [full for full in files if os.path.exists(full)]
    if not present:
        raise VisualizerValueError(
            "{}: no rank of the {} processes saved its file ({} ...); the run failed before "
            "saving, or load it once the ranks have saved".format(
                os.fspath(path), len(files), os.path.basename(files[0])))
    return present
