"""Where captures are kept: in memory, in one ``.npz`` file, in a stream folder, per rank.

One way in and one way out: :func:`save` writes a cache (and what a view of it
needs) and :func:`load` reads back every format :func:`save` or a stream
writes; ``get_local.save``/``load``, ``visualizer.views.save``/``load`` and the
command line all go through them.

* ``memory``: the in-memory cache and how each value is stored (``Storage``);
* ``npz``: one cache in one ``.npz`` file, without pickle;
* ``stream``: a folder written capture by capture, read back lazily;
* ``ranks``: one file per process under ``torch.distributed`` and their manifest.
"""
from . import npz as _npz, ranks as _ranks

__all__ = ["save", "load", "load_context"]


def save(cache, path, context=None):
    """Save ``cache`` to ``path`` (one ``.npz``, or one per rank and a manifest); return the path written.

    ``context`` is a dict of what a view of the file needs (tokens, image,
    layer names; see ``visualizer.views.save``).
    """
    return _ranks.save(cache, path, context=context)


def load(path, rank=None):
    """Return the cache in ``path``: an ``.npz`` file, a rank manifest or a stream folder."""
    return _ranks.load(path, rank)


def load_context(path):
    """Return what :func:`save` stored beside the captures in ``path`` (``{}`` if nothing)."""
    return _npz.load_context(path)
