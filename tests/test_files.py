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
