"""Files of many processes: one per rank under ``torch.distributed``, loaded merged or per rank.

Under ``torchrun`` (or any launcher that sets ``RANK`` and ``WORLD_SIZE``, or
once ``torch.distributed`` is initialised) every process captures its own
calls, and ``get_local.save('caps.npz')`` writes ``caps.rank<r>.npz`` for
its rank plus ``caps.npz`` itself: a small manifest (an ``.npz`` holding only
``{'format': 'visualizer-ranks', 'world_size': N, 'files': [...]}``), the
same from every rank, written by each (to a temporary name, then renamed,
so a reader never sees half a file).  ``load('caps.npz')`` merges the ranks
that saved (rank 0's calls first in every list) and warns about those that
did not (a process that failed before saving); ``load(path, rank=r)`` gives
one rank's.  A single process saves and loads one plain file, as before.

Torch is never imported here: the rank is read from ``torch.distributed``
only when torch is imported already, else from the environment.
"""
import json
import os
import sys
import warnings

from .._errors import CaptureWarning, VisualizerTypeError, VisualizerValueError

FORMAT = "visualizer-ranks"
VERSION = 1


def rank_and_world():
    """``(rank, world size)`` of this process, or None when it is the only one."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            return (dist.get_rank(), world) if world > 1 else None
    except (RuntimeError, ValueError):  # a group being torn down: the environment says
        pass
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    try:
        rank, world = int(rank), int(world)
    except (TypeError, ValueError):
        return None
    return (rank, world) if world > 1 and 0 <= rank < world else None


def rank_path(path, rank):
    """``caps.npz`` -> ``caps.rank3.npz`` (the extension, if any, stays last)."""
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)
    return "{}.rank{}{}".format(stem, rank, ext)


def save(cache, path, context=None):
    """Save ``cache`` for this process; return the file written (see the module docstring)."""
    from .npz import MANIFEST, _check_path, save_cache

    _check_path(path, "save")
    ranks = rank_and_world()
    if ranks is None:
        save_cache(cache, path, context=context)
        return os.fspath(path)
    import numpy as np

    rank, world = ranks
    mine = rank_path(path, rank)
    _atomically(mine, lambda tmp: save_cache(cache, tmp, context=context))
    manifest = {"format": FORMAT, "version": VERSION, "world_size": world,
                "files": [os.path.basename(rank_path(path, r)) for r in range(world)]}
    blob = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **{MANIFEST: blob})

    _atomically(os.fspath(path), write)
    return mine


def _atomically(path, write):
    """``write(temporary name)``, then rename it to ``path``: readers see all or nothing."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, ".{}.{}.tmp".format(name, os.getpid()))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def manifest_of(path):
    """The manifest of a rank set saved at ``path``, or None for any other file."""
    import zipfile

    from .npz import MANIFEST

    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            if MANIFEST + ".npy" not in archive.namelist():
                return None
            import numpy as np

            with archive.open(MANIFEST + ".npy") as fh:
                data = np.lib.format.read_array(fh, allow_pickle=False)
        manifest = json.loads(data.tobytes().decode("utf-8"))
    except (OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def load(path, rank=None):
    """Load a cache, a rank set or a stream folder (see ``GetLocal.load``)."""
    from . import stream as _stream
    from .npz import _check_path, load_cache

    _check_path(path, "load")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise VisualizerTypeError(
            "rank must be a process number (an int >= 0) or None for every rank, got "
            "{!r}".format(rank))
    if _stream.is_stream(path):
        return _stream.open_stream(path, rank)
    manifest = manifest_of(path) if os.path.isfile(path) else None
    if manifest is None:
        if rank is not None:
            raise VisualizerValueError(
                "load({!r}, rank={}): that file was saved by a single process; rank= picks "
                "one process of a run under torch.distributed (files saved as "
                "<name>.rank<r>.npz beside it). Load it without rank=.".format(
                    os.fspath(path), rank))
        return load_cache(path)
    world = manifest.get("world_size")
    files = manifest.get("files")
    if not isinstance(world, int) or not isinstance(files, list) or len(files) != world:
        raise VisualizerValueError(
            "{} looks like a visualizer rank manifest but is damaged".format(os.fspath(path)))
    folder = os.path.dirname(os.fspath(path))
    if rank is not None:
        if rank >= world:
            raise VisualizerValueError(
                "load({!r}, rank={}): the run had {} processes (ranks 0 to {})".format(
                    os.fspath(path), rank, world, world - 1))
        return load_cache(os.path.join(folder, files[rank]))
    merged, missing = {}, []
    for r, name in enumerate(files):
        full = os.path.join(folder, name)
        if not os.path.exists(full):
            missing.append(r)
            continue
        for key, values in load_cache(full).items():
            merged.setdefault(key, []).extend(values)
    if len(missing) == world:
        raise VisualizerValueError(
            "{}: no rank of the {} processes saved its file ({} ...)".format(
                os.fspath(path), world, files[0]))
    if missing:
        warnings.warn(
            "{}: rank{} {} of {} saved nothing ({} missing: that process failed before saving, "
            "or has not saved yet); loaded the other ranks".format(
                os.fspath(path), "s" if len(missing) > 1 else "",
                ", ".join(map(str, missing)), world, ", ".join(files[r] for r in missing)),
            CaptureWarning, stacklevel=3)
    return merged
