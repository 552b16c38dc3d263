"""Streaming captures to disk: a folder of ``.npy`` files and an append-only index.

``get_local.capture(stream='run.vz')`` (or ``configure(stream=...)``) writes
each captured value as it is stored, so a long run's memory stays flat::

    run.vz/
      visualizer-stream.json    {"format": "visualizer-stream", "version": 1, "world_size": 1}
      index.rank0.jsonl         one line per value: {"key", "file", "shape", "dtype", "scalar",
                                "run"}
      rank0-00000000.npy        the values, one plain NumPy file each
      rank0-00000001.npy

Why this format: NumPy's own ``.npy`` needs nothing beyond NumPy (the core's
only array library), is read partially by ``numpy.load(mmap_mode='r')``
(one head, a row range: only those pages are read), and every tool that
reads NumPy reads it; safetensors would add a dependency to the core and
zarr a heavier one, for chunking we get from one file per capture.  Each
file is written under a temporary name and renamed, and only then is its
line appended to the index (one ``write`` of a whole line), so a reader,
even in another process while the run goes on, never sees half a value:
it reads the lines that end in a newline and ignores anything else.

Under ``torch.distributed`` each rank writes its own index and files
(``index.rank1.jsonl``, ``rank1-...``) in the same folder; ``open_stream``
merges them in rank order, or reads one rank's.

Runs are never mixed unasked: opening a writer on a folder whose index (this
rank's) holds captures already is refused unless the caller passes
``append=True``.  Each writer is one run, numbered from 0 in the order runs
were written (the next number after the largest in this rank's index, so
the ranks of one ``torchrun`` launch agree); every index line records its
``"run"`` (lines written before runs were recorded count as run 0).
``open_stream(folder, run=1)`` reads one run, ``run=-1`` the latest;
``StreamCache.runs`` lists the runs a folder holds.

A stream records no context (tokens, image: what ``visualizer.views.save``
keeps in an ``.npz``): ``visualizer.storage.load_context`` of a stream
folder is ``{}``, and ``visualizer view`` shows it with positions for tokens.
"""
import collections.abc
import json
import os
import re
import threading

from .._errors import VisualizerTypeError, VisualizerValueError
from . import memory as _store
from ._disk import atomically, rank_and_world

FORMAT = "visualizer-stream"
VERSION = 1
MANIFEST = "visualizer-stream.json"


def is_stream(path):
    """Whether ``path`` is a folder written by a stream."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def _index_name(rank):
    return "index.rank{}.jsonl".format(rank)


class CaptureList(collections.abc.Sequence):
    """The values of one key in a stream, read from disk when indexed.

    ``values[i]`` is a read-only ``numpy.memmap`` (Python numbers come back as
    numbers): slicing it, e.g. ``values[3][0, 2, 100:200]``, reads only those
    bytes.  ``np.array(values[i])`` makes an in-memory copy.
    """

    def __init__(self, folder, entries=None, writer=None, key=None):
        self.folder = folder
        self.entries = [] if entries is None else entries
        self._writer = writer
        self._key = key

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._read(entry) for entry in self.entries[index]]
        return self._read(self.entries[index])

    def _read(self, entry):
        import numpy as np

        path = os.path.join(self.folder, entry["file"])
        if entry.get("scalar"):
            return np.load(path, allow_pickle=False).item()
        if not all(entry.get("shape") or [0]):  # a memory map of nothing is refused
            return np.load(path, allow_pickle=False)
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def shape(self, index):
        """The shape of value ``index``, from the index alone (no file is opened)."""
        return tuple(self.entries[index]["shape"])

    def run(self, index):
        """The run that wrote value ``index`` (0 for the first run into the folder)."""
        return _run_of(self.entries[index])

    def append(self, value):
        """Write ``value`` to the stream (only for a stream being written)."""
        if self._writer is None:
            raise VisualizerValueError(
                "this stream was opened for reading; capture into it with "
                "get_local.capture(stream={!r})".format(self.folder))
        self.entries.append(self._writer.write(self._key, value))

    def clear(self):
        raise VisualizerValueError(
            "the captures of a stream live on disk in {} and are not cleared by "
            "get_local.clear(); delete that folder, or stream into a new one".format(
                self.folder))

    def __eq__(self, other):
        return list(self) == list(other) if isinstance(other, (list, CaptureList)) else NotImplemented

    def __repr__(self):
        return "<{} values of {!r} streamed to {}>".format(len(self), self._key, self.folder)


class StreamCache(_store.Cache):
    """A cache whose values live in a stream folder: ``{key: CaptureList}``.

    What ``get_local.capture(stream=...)`` yields and ``get_local.load`` of a
    stream folder returns; it reads like the in-memory cache.
    """

    def __init__(self, folder, writer=None, runs=()):
        super().__init__()
        self.folder = folder
        self.writer = writer
        #: The runs whose values this cache holds, in the order written (see ``open_stream``).
        self.runs = list(runs)

    def add(self, key, value, source_ref=_store.NO_SOURCE):
        values = self.get(key)
        if values is None:
            values = self[key] = CaptureList(self.folder, writer=self.writer, key=key)
        values.append(value)
        if source_ref is not _store.NO_SOURCE:
            self.sources.setdefault(key, []).append(source_ref)

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = CaptureList(self.folder, writer=self.writer, key=key)
        return self[key]

    def trim(self, key, keep_last):
        raise VisualizerValueError("a stream keeps every capture; keep_last does not apply")

    def clear_values(self):
        for values in self.values():
            values.clear()

    def close(self):
        """Stop writing (the index is flushed at every line; this closes its file)."""
        if self.writer is not None:
            self.writer.close()

    def __repr__(self):
        return "<stream {}: {} keys, {} values>".format(
            self.folder, len(self), sum(len(v) for v in self.values()))


class _Writer:
    """Writes one process's values into a stream folder."""

    def __init__(self, folder, rank, world, run=0):
        self.folder = folder
        self.rank = rank
        self.run = run
        self.lock = threading.Lock()
        prefix = "rank{}-".format(rank)
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.npy$")
        numbers = [int(m.group(1)) for m in map(pattern.match, os.listdir(folder)) if m]
        self.next = max(numbers) + 1 if numbers else 0
        self.prefix = prefix
        self.index = open(os.path.join(folder, _index_name(rank)), "a", encoding="utf-8")

    def write(self, key, value):
        import numpy as np

        scalar = isinstance(value, (bool, int, float, complex)) and not isinstance(
            value, np.generic)
        try:
            array = np.asarray(value)
        except Exception as exc:
            raise VisualizerTypeError(
                "cannot stream {} captured under {!r}: {}".format(
                    type(value).__name__, key, exc)) from None
        if array.dtype.hasobject or array.dtype.kind in "USV":
            raise VisualizerTypeError(
                "cannot stream {} captured under {!r} without pickle; capture arrays or "
                "numbers (a transform can make one)".format(type(value).__name__, key))
        with self.lock:
            if self.index is None:
                raise VisualizerValueError("the stream to {} is closed".format(self.folder))
            name = "{}{:08d}.npy".format(self.prefix, self.next)
            self.next += 1
            path = os.path.join(self.folder, name)

            def save(tmp):
                with open(tmp, "wb") as fh:
                    np.save(fh, array, allow_pickle=False)

            atomically(path, save)
            entry = {"key": key, "file": name, "shape": list(array.shape),
                     "dtype": array.dtype.str, "scalar": scalar, "run": self.run}
            self.index.write(json.dumps(entry) + "\n")
            self.index.flush()
        return entry

    def close(self):
        with self.lock:
            if self.index is not None:
                self.index.close()
                self.index = None


def open_writer(folder, append=False):
    """A ``StreamCache`` that writes a new run into ``folder`` (made if missing).

    The cache holds this run's values alone; ``open_stream`` reads them all.
    A folder whose index holds captures is refused unless ``append`` is true:
    a second run would otherwise be mixed into the first without a word.
    """
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise VisualizerValueError(
            "stream={!r} is a file; stream into a folder (it is made if missing)".format(folder))
    if os.path.isdir(folder) and os.listdir(folder) and not is_stream(folder):
        raise VisualizerValueError(
            "stream={!r}: that folder holds other files and no {}; stream into a new or "
            "empty folder".format(folder, MANIFEST))
    rank, world = rank_and_world() or (0, 1)
    written = _read_index(folder, rank)
    runs = _runs_in(written)
    if written and not append:
        raise VisualizerValueError(
            "stream={!r} holds {} captures already ({} run{}: keys {}); a new run would be "
            "mixed into them. Stream into a new folder, delete this one, or pass "
            "append=True to add a run (get_local.load({!r}, run=-1) then reads the new run "
            "alone)".format(folder, sum(map(len, written.values())), len(runs),
                            "" if len(runs) == 1 else "s",
                            ", ".join(map(repr, sorted(written)[:4])) +
                            (", ..." if len(written) > 4 else ""), folder))
    os.makedirs(folder, exist_ok=True)
    manifest = {"format": FORMAT, "version": VERSION, "world_size": world}

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh)

    atomically(os.path.join(folder, MANIFEST), write)
    run = runs[-1] + 1 if runs else 0
    return StreamCache(folder, _Writer(folder, rank, world, run), [run])


def _run_of(entry):
    return entry.get("run", 0)


def _runs_in(by_key):
    """The sorted run numbers in ``{key: [entries]}``."""
    return sorted({_run_of(entry) for entries in by_key.values() for entry in entries})


def _read_index(folder, rank):
    """``{key: [entries]}`` from the complete lines of one rank's index."""
    out = {}
    path = os.path.join(folder, _index_name(rank))
    if not os.path.exists(path):
        return out
    with open(path, "r", encoding="utf-8") as fh:
        text = fh.read()
    for line in text.split("\n")[:-1]:  # the last piece has no newline: not written yet
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            out.setdefault(entry["key"], []).append(entry)
        except (ValueError, KeyError, TypeError) as exc:
            raise VisualizerValueError(
                "{} is damaged: {}".format(path, exc)) from None
    return out


def open_stream(folder, rank=None, run=None):
    """Read a stream folder: every rank merged (rank 0's values first) or one ``rank``'s.

    Every run is read, in the order written, unless ``run`` picks one: its
    number (``cache.runs`` lists them) or a negative index into them
    (``run=-1``: the latest).  A snapshot of what was written when it is
    called: call it again to see values written since.
    """
    folder = os.fspath(folder)
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except ValueError as exc:
        raise VisualizerValueError("{}: its {} is damaged: {}".format(folder, MANIFEST, exc)) \
            from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise VisualizerValueError(
            "{} is not a visualizer stream of version {} (its manifest says {!r})".format(
                folder, VERSION, manifest))
    ranks = sorted(int(m.group(1)) for m in (re.match(r"index\.rank(\d+)\.jsonl$", name)
                                             for name in os.listdir(folder)) if m)
    if rank is not None:
        if rank not in ranks:
            raise VisualizerValueError(
                "load({!r}, rank={}): no value of rank {} in this stream (ranks with values: "
                "{})".format(folder, rank, rank, ", ".join(map(str, ranks)) or "none"))
        ranks = [rank]
    merged = {}
    for r in ranks:
        for key, entries in _read_index(folder, r).items():
            merged.setdefault(key, []).extend(entries)
    runs = _runs_in(merged)
    if run is not None:
        picked = _pick_run(folder, runs, run)
        runs = [picked]
        merged = {key: [e for e in entries if _run_of(e) == picked]
                  for key, entries in merged.items()}
        merged = {key: entries for key, entries in merged.items() if entries}
    cache = StreamCache(folder, runs=runs)
    for key, entries in merged.items():
        cache[key] = CaptureList(folder, entries, key=key)
    return cache


def _pick_run(folder, runs, run):
    """The run number that ``run`` (a number, or a negative index into ``runs``) names."""
    if isinstance(run, bool) or not isinstance(run, int):
        raise VisualizerTypeError(
            "run must be a run number (an int; -1 for the latest) or None for every run, got "
            "{!r}".format(run))
    picked = runs[run] if run < 0 and -len(runs) <= run else run
    if picked not in runs:
        raise VisualizerValueError(
            "load({!r}, run={}): this stream holds run{} {}; pass one of them, a negative "
            "index (-1: the latest), or run=None for all".format(
                folder, run, "" if len(runs) == 1 else "s",
                ", ".join(map(str, runs)) or "none"))
    return picked
