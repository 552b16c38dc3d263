"""Where captures are kept: in memory, in one ``.npz`` file, in a stream folder, per rank.

One way in and one way out: :func:`save` writes a cache (and what a view of it
needs) and :func:`load` reads back every format :func:`save` or a stream
writes; ``get_local.save``/``load``, ``visualizer.views.save``/``load`` and the
command line (``visualizer plot``, ``visualizer view``) all go through them.

* ``memory``: the in-memory cache and how each value is stored (``Storage``);
* ``_disk``: what the formats on disk share (atomic writes, this process's rank);
* ``npz``: one cache in one ``.npz`` file, without pickle;
* ``stream``: a folder written capture by capture, read back lazily;
* ``ranks``: one ``.npz`` per process under ``torch.distributed`` and their manifest.

Data flows one way: ``_disk`` at the bottom, the formats on it (``ranks`` on
``npz``), and this module on top, the only one that tells the formats apart.
"""
import os

from .._errors import VisualizerTypeError, VisualizerValueError
from . import npz as _npz, ranks as _ranks, stream as _stream
from ._disk import check_path, rank_and_world

__all__ = ["save", "load", "load_context"]


def save(cache, path, context=None):
    """Save ``cache`` to ``path``; return the path written.

    One ``.npz`` file; under ``torch.distributed`` (``RANK``/``WORLD_SIZE``
    set, or a process group initialised) ``<name>.rank<r>.npz`` for this
    rank and a manifest of the ranks at ``path``, and the rank file is
    returned.  ``context`` is a dict of what a view of the file needs
    (tokens, image, layer names; see ``visualizer.views.save``).

    >>> storage.save({'attn': [maps]}, 'caps.npz')   # doctest: +SKIP
    'caps.npz'
    """
    check_path(path, "save")
    ranks = rank_and_world()
    if ranks is None:
        _npz.save_cache(cache, path, context=context)
        return os.fspath(path)
    return _ranks.save(cache, path, *ranks, context=context)


def load(path, rank=None, run=None):
    """Return the captures in ``path``: ``{key: [value of each call, ...]}``.

    ``path`` is an ``.npz`` file, the manifest of a run's ranks (every rank
    merged, rank 0's calls first; a missing rank is named in a warning) or
    a stream folder (values read lazily, as read-only memory maps).
    ``rank=r`` gives process ``r``'s captures alone.  A stream folder
    written by several runs (``stream=..., append=True``) lists them in
    ``cache.runs``; ``run=k`` reads run ``k`` alone (``run=-1``: the latest).

    >>> storage.load('caps.npz', rank=1)['attn']   # doctest: +SKIP
    >>> storage.load('run.vz', run=-1)['attn']     # doctest: +SKIP
    """
    check_path(path, "load")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise VisualizerTypeError(
            "rank must be a process number (an int >= 0) or None for every rank, got "
            "{!r}".format(rank))
    kind, manifest = _format(path)
    if kind == "stream":
        return _stream.open_stream(path, rank, run)
    if run is not None:
        raise VisualizerValueError(
            "load({!r}, run={!r}): run= picks one run of a stream folder (written with "
            "stream=..., append=True); a file saved by save() holds one run. Load it "
            "without run=.".format(os.fspath(path), run))
    if kind == "ranks":
        return _ranks.load(path, manifest, rank)
    if rank is not None:
        raise VisualizerValueError(
            "load({!r}, rank={}): that file was saved by a single process; rank= picks "
            "one process of a run under torch.distributed (files saved as "
            "<name>.rank<r>.npz beside it). Load it without rank=.".format(
                os.fspath(path), rank))
    return _npz.load_cache(path)


def load_context(path):
    """Return what :func:`save` stored beside the captures in ``path`` (``{}`` if nothing).

    For a manifest of ranks, the context of the first rank file there is
    (every rank saves the same); a stream folder records none, so ``{}``.
    """
    check_path(path, "load")
    kind, manifest = _format(path)
    if kind == "stream":
        return {}
    if kind == "ranks":
        return _ranks.load_context(path, manifest)
    return _npz.load_context(path)


def _format(path):
    """Return ``(kind, manifest)``: ``'stream'``, ``'ranks'`` (with its manifest) or ``'npz'``.

    ``'npz'`` stands for anything else too: ``npz`` explains what is wrong
    with a file that is not a cache.
    """
    if _stream.is_stream(path):
        return "stream", None
    if os.path.isdir(path):
        raise VisualizerValueError(
            "{} is a folder, not captures saved by visualizer: not a stream folder (it has "
            "no {}) and not a readable .npz archive; pass a file written by get_local.save "
            "or 'visualizer run', or a folder written by get_local.capture(stream=...)".format(
                os.fspath(path), _stream.MANIFEST))
    manifest = _ranks.manifest_of(path)
    return ("ranks", manifest) if manifest is not None else ("npz", None)
