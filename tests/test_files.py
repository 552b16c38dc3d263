"""Saving a cache to one file and loading it back, without pickle."""
import zipfile

import pytest

from conftest import require
from visualizer import VisualizerError


def test_round_trip_keeps_keys_order_values_and_types(gl, tmp_path):
    np = require("numpy")
    cache = {
        "Attention.forward": [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 2, 2))],
        "z.first_in_order_not_alphabet": [np.array([True, False])],
        "f.scalar": [3, 2.5, np.float64(1.5)],
        "empty": [],
    }
    path = tmp_path / "cache.npz"
    gl.save(path, cache)
    loaded = gl.load(path)
    assert list(loaded) == list(cache)
    for key in cache:
        assert len(loaded[key]) == len(cache[key])
        for got, want in zip(loaded[key], cache[key]):
            np.testing.assert_array_equal(got, want)
            assert np.asarray(got).dtype == np.asarray(want).dtype
    assert type(loaded["f.scalar"][0]) is int and type(loaded["f.scalar"][1]) is float
    assert isinstance(loaded["f.scalar"][2], np.ndarray)


def test_save_the_live_cache(gl, tmp_path):
    np = require("numpy")

    @gl("y")
    def f(x):
        y = np.full(3, x)
        return 0

    f(1)
    f(2)
    gl.save(tmp_path / "live.npz")
    loaded = gl.load(tmp_path / "live.npz")
    assert [v.tolist() for v in loaded[f.__qualname__]] == [[1, 1, 1], [2, 2, 2]]


def test_file_holds_no_pickle(gl, tmp_path):
    np = require("numpy")
    path = tmp_path / "c.npz"
    gl.save(path, {"k": [np.zeros(2)]})
    with np.load(path, allow_pickle=False) as archive:
        assert set(archive.files) == {"0/0", "__visualizer__"}


def test_values_that_need_pickle_are_refused(gl, tmp_path):
    require("numpy")
    with pytest.raises(TypeError, match=r"cache\['k'\]\[1\] is dict, which cannot be saved"):
        gl.save(tmp_path / "x.npz", {"k": [1, {"a": 1}]})
    with pytest.raises(TypeError, match="must be a list"):
        gl.save(tmp_path / "x.npz", {"k": 3})


@pytest.mark.parametrize("content, pattern", [
    (b"not a zip at all", "not a cache saved by visualizer"),
    (b"", "not a cache saved by visualizer"),
])
def test_foreign_files_are_clear_errors(gl, tmp_path, content, pattern):
    require("numpy")
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern) as info:
        gl.load(path)
    assert isinstance(info.value, VisualizerError)


def test_other_npz_and_npy_files(gl, tmp_path):
    np = require("numpy")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="has no '__visualizer__' entry; its entries are: a"):
        gl.load(tmp_path / "other.npz")
    np.save(tmp_path / "single.npy", np.zeros(2))
    with pytest.raises(ValueError, match="single NumPy array"):
        gl.load(tmp_path / "single.npy")


def test_damaged_cache_files(gl, tmp_path):
    np = require("numpy")
    path = tmp_path / "c.npz"
    gl.save(path, {"k": [np.arange(100000)]})
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="visualizer"):
        gl.load(truncated)
    # A manifest that names a value the archive does not hold.
    broken = tmp_path / "broken.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        dst.writestr("__visualizer__.npy", src.read("__visualizer__.npy"))
    with pytest.raises(ValueError, match="is damaged"):
        gl.load(broken)


def test_missing_file(gl, tmp_path):
    require("numpy")
    with pytest.raises(FileNotFoundError):
        gl.load(tmp_path / "nope.npz")


# -- storage: one load for every format, data flowing one way ----------------------------

def test_load_and_load_context_read_every_format(gl, tmp_path, monkeypatch):
    np = require("numpy")
    from visualizer import storage

    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        storage.save({"k": [np.full(2, rank)]}, tmp_path / "ranks.npz", context={"title": "t"})
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    storage.save({"k": [np.zeros(2)]}, tmp_path / "one.npz", context={"title": "one"})

    @gl("y")
    def f(x):
        y = np.full(2, x)
        return y

    with gl.capture(stream=tmp_path / "run.vz"):
        f(7)
    assert [v.tolist() for v in storage.load(tmp_path / "ranks.npz")["k"]] == [[0, 0], [1, 1]]
    assert storage.load_context(tmp_path / "ranks.npz") == {"title": "t"}  # every rank's
    assert storage.load_context(tmp_path / "one.npz") == {"title": "one"}
    assert storage.load(tmp_path / "run.vz")[f.__qualname__][0].tolist() == [7, 7]
    assert storage.load_context(tmp_path / "run.vz") == {}  # a stream records no context
    (tmp_path / "plain").mkdir()
    for read in (storage.load, storage.load_context):
        with pytest.raises(VisualizerError, match=r"plain is a folder.*no visualizer-stream.json"):
            read(tmp_path / "plain")


def test_the_damaged_manifest_of_ranks_says_what_it_lists(tmp_path):
    require("numpy")
    from visualizer.storage import load, npz

    npz.save_manifest(tmp_path / "m.npz", {"format": "visualizer-ranks", "world_size": 0,
                                           "files": []})
    with pytest.raises(VisualizerError, match=r"rank manifest but is damaged.*world_size 0"):
        load(tmp_path / "m.npz")


def storage_imports():
    """``{module file: [what it imports from the package]}`` for every file of storage/."""
    import ast
    import os

    from conftest import ROOT

    folder = os.path.join(ROOT, "visualizer", "storage")
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            found[name] = sorted(
                "." * node.level + (node.module or alias.name) for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level
                for alias in node.names)  # "from . import npz" is ".npz"
    return found


def test_storage_data_flows_one_way():
    # The core rule: storage knows nothing of the layers above it.  Storage.prepare's lazy
    # import of the kernel's reduce_map goes when the maps' mathematics moves to attention.py.
    above = ("..integrations", "..views", "..cli")
    for name, modules in storage_imports().items():
        strays = [m for m in modules if m.startswith(above)
                  and (name, m) != ("memory.py", "..integrations.kernel")]
        assert not strays, (name, strays)
    # Inside: _disk at the bottom, the formats on it, __init__ alone tells them apart.
    within = {name: {m for m in modules if not m.startswith("..")}
              for name, modules in storage_imports().items()}
    assert within["_disk.py"] == set()
    assert within["npz.py"] == within["ranks.py"] - {".npz"} == {"._disk"}
    assert within["stream.py"] == {".memory", "._disk"}
