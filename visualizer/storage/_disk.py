"""What every format on disk shares: path checks, atomic writes, this process's rank.

The bottom of ``storage``: ``npz``, ``stream`` and ``ranks`` build on it and it
imports none of them, so data flows one way.  Torch is never imported here:
the rank is read from ``torch.distributed`` only when torch is imported
already, else from the environment (``RANK``/``WORLD_SIZE``, as ``torchrun``
sets them).
"""
import os
import sys

from .._errors import VisualizerTypeError


def check_path(path, verb):
    """Refuse anything but a path: ``open`` would take an int as a file descriptor."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise VisualizerTypeError(
            "{} needs a file path (str or os.PathLike), got {} {!r}".format(
                verb, type(path).__name__, path))


def atomically(path, write):
    """Call ``write(temporary name)``, then rename it to ``path``: readers see all or nothing.

    The temporary file sits beside ``path`` (a rename across file systems
    would copy) and is removed if ``write`` fails.
    """
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, ".{}.{}.tmp".format(name, os.getpid()))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rank_and_world():
    """Return ``(rank, world size)`` of this process, or None when it is the only one."""
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
