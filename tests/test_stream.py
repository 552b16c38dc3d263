"""Streaming captures to disk: equal to in-memory captures, read partially and while written."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, require
from visualizer import VisualizerError


A = "watched_function.<locals>.layer.attn"
S = "watched_function.<locals>.layer.step"


def watched_function(gl):
    np = require("numpy")

    @gl("attn", "step")
    def layer(x, n):
        attn = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5) * x
        step = n
        return attn

    return layer


def test_a_stream_equals_the_in_memory_captures_and_loads_back(gl, tmp_path):
    np = require("numpy")
    layer = watched_function(gl)
    with gl.capture() as memory:
        for n in range(4):
            layer(n + 1.5, n)
    with gl.capture(stream=tmp_path / "run.vz") as streamed:
        for n in range(4):
            layer(n + 1.5, n)
    loaded = gl.load(tmp_path / "run.vz")
    for cache in (streamed, loaded):
        assert list(cache) == list(memory)
        for key in memory:
            assert len(cache[key]) == len(memory[key]) == 4
            for got, want in zip(cache[key], memory[key]):
                if isinstance(want, int):
                    assert got == want and type(got) is int
                else:
                    np.testing.assert_array_equal(got, want)
    assert not gl.cache.get(A), "the stream kept nothing in the outer cache"
    assert len(os.listdir(tmp_path / "run.vz")) == 2 + 8  # manifest, index, 8 values


def test_values_are_memory_maps_read_partially_without_the_rest(gl, tmp_path):
    np = require("numpy")
    layer = watched_function(gl)
    with gl.capture(stream=str(tmp_path / "run.vz")):
        for n in range(3):
            layer(n + 1.0, n)
    folder = tmp_path / "run.vz"
    index = [json.loads(line) for line in (folder / "index.rank0.jsonl").read_text().splitlines()]
    # Remove every file but the one we read: reading it must not need the others.
    keep = [e for e in index if e["key"] == A][1]["file"]
    for entry in index:
        if entry["file"] != keep:
            os.remove(folder / entry["file"])
    cache = gl.load(folder)
    value = cache[A][1]
    assert isinstance(value, np.memmap) and not value.flags.writeable
    want = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5) * 2.0
    np.testing.assert_array_equal(value[1, 2, 1:4], want[1, 2, 1:4])  # one head, a row range
    assert cache[A].shape(0) == (2, 3, 5, 5)  # shapes from the index alone
    with pytest.raises(FileNotFoundError):
        cache[A][0]


def test_readable_while_written_and_half_lines_ignored(gl, tmp_path):
    layer = watched_function(gl)
    folder = tmp_path / "run.vz"
    with gl.capture(stream=folder):
        layer(1.0, 0)
        assert len(gl.load(folder)[A]) == 1
        layer(2.0, 1)
        assert len(gl.load(folder)[A]) == 2
        with open(folder / "index.rank0.jsonl", "a") as fh:  # a writer caught mid-line
            fh.write('{"key": A, "fi')
            fh.flush()
        assert len(gl.load(folder)[A]) == 2


def test_a_reader_in_another_process_sees_the_values_so_far(gl, tmp_path):
    np = require("numpy")
    layer = watched_function(gl)
    folder = tmp_path / "run.vz"
    reader = textwrap.dedent("""
        import sys
        sys.path.insert(0, {root!r})
        from visualizer import get_local
        cache = get_local.load({folder!r})
        print(len(cache['watched_function.<locals>.layer.attn']), float(cache['watched_function.<locals>.layer.attn'][-1][0, 0, 0, 1]))
    """).format(root=ROOT, folder=str(folder))
    with gl.capture(stream=folder):
        layer(1.0, 0)
        layer(3.0, 1)
        out = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True,
                             timeout=60)
        layer(5.0, 2)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "3.0"]
    assert len(gl.load(folder)[A]) == 3
    assert np.isclose(gl.load(folder)[A][-1][0, 0, 0, 1], 5.0)


def test_a_second_capture_appends_and_configure_streams_until_turned_off(gl, tmp_path):
    layer = watched_function(gl)
    folder = tmp_path / "run.vz"
    with gl.capture(stream=folder):
        layer(1.0, 0)
    with gl.capture(stream=folder, append=True):
        layer(2.0, 1)
    assert [int(v) for v in gl.load(folder)[S]] == [0, 1]
    gl.clear()
    before = gl.cache
    gl.configure(stream=tmp_path / "other.vz")
    layer(3.0, 7)
    assert gl.cache is not before and list(gl.cache[S]) == [7]
    assert gl.configure() == {"store": "numpy", "transform": None, "keep_last": None,
                              "queries": None, "heads": None,
                              "stream": tmp_path / "other.vz"}
    assert gl.cache is before
    layer(4.0, 8)
    assert before[S] == [8]
    assert list(gl.load(tmp_path / "other.vz")[S]) == [7]


def test_a_second_run_is_refused_unless_appended_and_load_tells_runs_apart(gl, tmp_path):
    layer = watched_function(gl)
    folder = tmp_path / "run.vz"
    with gl.capture(stream=folder) as first:
        layer(1.0, 0)
        layer(1.0, 1)
    assert first.runs == [0]
    with pytest.raises(VisualizerError, match=r"holds 4 captures already \(1 run: keys .*"
                                              r"append=True"):
        with gl.capture(stream=folder):
            layer(9.0, 9)
    with pytest.raises(VisualizerError, match="holds 4 captures already"):
        gl.configure(stream=folder)
    assert [int(v) for v in gl.load(folder)[S]] == [0, 1]  # the refused runs wrote nothing
    with gl.capture(stream=folder, append=True) as second:
        layer(2.0, 2)
    assert second.runs == [1] and list(second[S]) == [2]  # this run's values alone
    before = gl.configure(stream=folder, append=True)
    layer(3.0, 3)
    assert gl.configure(**before)["append"] is True
    every = gl.load(folder)
    assert every.runs == [0, 1, 2] and [int(v) for v in every[S]] == [0, 1, 2, 3]
    assert [every[S].run(i) for i in range(4)] == [0, 0, 1, 2]
    assert [int(v) for v in gl.load(folder, run=0)[S]] == [0, 1]
    latest = gl.load(folder, run=-1)
    assert latest.runs == [2] and [int(v) for v in latest[S]] == [3]
    with pytest.raises(VisualizerError, match=r"run=5.*holds runs 0, 1, 2"):
        gl.load(folder, run=5)
    with pytest.raises(VisualizerError, match="append=True adds a run"):
        gl.configure(append=True)
    gl.save(tmp_path / "c.npz", {S: [int(v) for v in every[S]]})
    with pytest.raises(VisualizerError, match="holds one run. Load it without run="):
        gl.load(tmp_path / "c.npz", run=0)


def test_index_lines_without_a_run_are_run_0(gl, tmp_path):
    layer = watched_function(gl)
    folder = tmp_path / "old.vz"
    with gl.capture(stream=folder):
        layer(1.0, 0)
    index = folder / "index.rank0.jsonl"
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    index.write_text("".join(json.dumps({k: v for k, v in line.items() if k != "run"}) + "\n"
                             for line in lines))
    assert gl.load(folder).runs == [0]
    with gl.capture(stream=folder, append=True) as appended:
        layer(2.0, 1)
    assert appended.runs == [1] and gl.load(folder).runs == [0, 1]


def test_streaming_kernel_captures_of_a_model(gl, tmp_path):
    torch = require("torch")
    np = require("numpy")
    transformers = require("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 5, 7, 9, 11, 13]])
    gl.deactivate()
    gl.watch_attention()
    try:
        with torch.no_grad():
            with gl.capture() as memory:
                model(input_ids=ids)
            with gl.capture(stream=tmp_path / "llama.vz", reduce="head_mean") as streamed:
                model(input_ids=ids)
            with gl.capture(reduce="head_mean") as reduced:
                model(input_ids=ids)
    finally:
        gl.unwatch_attention()
    key = "LlamaAttention.forward"
    assert len(streamed[key]) == 2 and streamed[key].shape(0) == (1, 6, 6)
    for got, full, want in zip(gl.load(tmp_path / "llama.vz")[key], memory[key], reduced[key]):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, full.mean(1), rtol=1e-6, atol=1e-7)
    assert list(gl.by_module(model, streamed)) == ["model.layers.0.self_attn",
                                                   "model.layers.1.self_attn"]


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(stream=3), "stream must be the path of a folder"),
    (dict(stream="x.vz", store="tensor"), "cannot be combined with store='tensor'"),
    (dict(stream="x.vz", keep_last=2), "keep_last=2 has nothing to bound"),
])
def test_bad_stream_options_are_refused(gl, kwargs, pattern):
    before = gl.configure()
    with pytest.raises(VisualizerError, match=pattern):
        gl.configure(**kwargs)
    with pytest.raises(VisualizerError, match=pattern):
        with gl.capture(**kwargs):
            pass
    assert gl.configure() == before


def test_a_folder_of_other_files_or_a_file_is_refused(gl, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(VisualizerError, match="holds other files"):
        with gl.capture(stream=tmp_path / "photos"):
            pass
    (tmp_path / "f").write_text("x")
    with pytest.raises(VisualizerError, match="is a file"):
        gl.configure(stream=tmp_path / "f")


@pytest.mark.filterwarnings("ignore:.*recorded nothing while capturing")
def test_unstreamable_values_warn_and_clear_says_where_they_are(gl, tmp_path):
    @gl("obj")
    def f():
        obj = object()
        return obj

    with pytest.warns(Warning, match="without pickle"):
        with gl.capture(stream=tmp_path / "s.vz") as cache:
            f()
    gl.configure(stream=tmp_path / "t.vz")
    watched_function(gl)(1.0, 0)
    with pytest.raises(VisualizerError, match="delete that folder"):
        gl.clear()
    gl.configure()
