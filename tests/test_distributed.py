"""Many processes: two CPU ranks on gloo under torchrun (``python -m torch.distributed.run``).

Each launch takes 20-40 s on two shared cores.  The workers compare nothing:
they capture, save with ``get_local.save`` and, beside it, their own
reference maps (a softmax written out by hand from the ``q``/``k``
projections that forward hooks recorded); the test loads both.  Under
``VISUALIZER_REQUIRE_ALL=1`` (the full CI run) a missing torch fails.
"""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, require
from visualizer import CaptureWarning, VisualizerError
from visualizer._get_local import GetLocal

COMMON = '''
import os, sys
import numpy as np
import torch
import torch.distributed as dist
F = torch.nn.functional
HEADS, DIM, TOKENS = 4, 16, 5


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(DIM, DIM), torch.nn.Linear(DIM, DIM)
        self.v, self.o = torch.nn.Linear(DIM, DIM), torch.nn.Linear(DIM, DIM)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, DIM // HEADS).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Attn(), Attn()])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def recording(net):
    """Forward hooks on every q and k projection; returns the list they fill."""
    seen = []
    for block in net.blocks:
        for name in ("q", "k"):
            getattr(block, name).register_forward_hook(
                lambda m, i, o, name=name: seen.append((name, o.detach().clone())))
    return seen


def by_hand(seen):
    """softmax(q kT / sqrt(d)) with the causal mask, one map per block, from the hooks."""
    maps = []
    for (_, q), (_, k) in zip(seen[0::2], seen[1::2]):
        B, T, width = q.shape
        q = q.double().view(B, T, -1, DIM // HEADS).transpose(1, 2)
        k = k.double().view(B, T, -1, DIM // HEADS).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        maps.append(torch.softmax(scores, -1).numpy())
    return maps
'''

WORKER = COMMON + '''
from visualizer import get_local
from torch.nn.parallel import DistributedDataParallel
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)

out = sys.argv[1]
assert os.environ["WORLD_SIZE"] == "2"
get_local.watch_attention()  # before the process group: files are per rank either way
dist.init_process_group("gloo")
rank = dist.get_rank()


def run(name, net, x, backward=True):
    seen = recording(net.module if hasattr(net, "module") else net)
    with get_local.capture() as cache:
        y = net(x)
        if backward:
            y.sum().backward()
    written = get_local.save(os.path.join(out, name + ".npz"), cache)
    assert written.endswith("{}.rank{}.npz".format(name, rank)), written
    np.savez(os.path.join(out, "ref_{}.rank{}.npz".format(name, rank)), *by_hand(seen))


torch.manual_seed(0)
base = Net()
batch = torch.randn(3, TOKENS, DIM, generator=torch.Generator().manual_seed(rank))[:rank + 1]

ddp = Net(); ddp.load_state_dict(base.state_dict())
run("ddp", DistributedDataParallel(ddp), batch)

fsdp = Net(); fsdp.load_state_dict(base.state_dict())
for block in fsdp.blocks:
    fully_shard(block)
fully_shard(fsdp)
run("fsdp", fsdp, batch)

tp = Net(); tp.load_state_dict(base.state_dict())
mesh = init_device_mesh("cpu", (2,))
for block in tp.blocks:  # heads split over the ranks: q, k, v by column, o by row
    parallelize_module(block, mesh, {"q": ColwiseParallel(), "k": ColwiseParallel(),
                                     "v": ColwiseParallel(), "o": RowwiseParallel()})
same = torch.randn(2, TOKENS, DIM, generator=torch.Generator().manual_seed(7))
with torch.no_grad():
    run("tp", tp, same, backward=False)
dist.destroy_process_group()
'''


def torchrun(tmp_path, *args, timeout=150):
    require("torch")
    dist = require("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *args], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=timeout)


KEY = "Attn.forward"


def test_ddp_fsdp2_and_tensor_parallel_ranks_save_apart_and_load_merged(tmp_path):
    np = require("numpy")
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "out").mkdir()
    done = torchrun(tmp_path, "worker.py", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-4000:]
    gl = GetLocal()
    out = tmp_path / "out"
    for name, shapes in (("ddp", [(1, 4, 5, 5), (2, 4, 5, 5)]),      # each rank's own batch
                         ("fsdp", [(1, 4, 5, 5), (2, 4, 5, 5)]),
                         ("tp", [(2, 2, 5, 5), (2, 2, 5, 5)])):      # each rank: its 2 heads
        assert sorted(p.name for p in out.glob(name + ".*")) == [
            name + ".npz", name + ".rank0.npz", name + ".rank1.npz"]
        merged = gl.load(out / (name + ".npz"))
        per_rank = [gl.load(out / (name + ".npz"), rank=r) for r in (0, 1)]
        refs = [list(np.load(out / "ref_{}.rank{}.npz".format(name, r)).values()) for r in (0, 1)]
        assert list(merged) == [KEY]
        assert [m.shape for m in merged[KEY]] == [shapes[0]] * 2 + [shapes[1]] * 2
        for r in (0, 1):
            assert [m.shape for m in per_rank[r][KEY]] == [shapes[r]] * 2
            for got, want in zip(per_rank[r][KEY], refs[r]):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
        for got, want in zip(merged[KEY], refs[0] + refs[1]):  # rank 0's calls first
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Tensor parallel: rank r holds heads 2r and 2r+1 of the whole layer.
    whole = [np.concatenate([gl.load(out / "tp.npz", rank=r)[KEY][i] for r in (0, 1)], axis=1)
             for i in (0, 1)]
    assert whole[0].shape == (2, 4, 5, 5)
    np.testing.assert_allclose(whole[0].sum(-1), 1.0, rtol=1e-5)


FAILING = COMMON + '''
import time
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
net = Net()
net(torch.randn(rank + 1, TOKENS, DIM))
dist.barrier()  # both ranks have captured one forward
if rank == 1:
    os._exit(3)  # a hard crash: nothing of rank 1 can be saved
time.sleep(100)  # torchrun stops rank 0 with SIGTERM; 'visualizer run' still saves it
'''


def test_a_run_where_one_rank_dies_still_saves_the_others(tmp_path):
    np = require("numpy")
    (tmp_path / "failing.py").write_text(FAILING)
    done = torchrun(tmp_path, "-m", "visualizer", "run", "--out", "caps.npz", "failing.py")
    assert done.returncode != 0
    assert (tmp_path / "caps.rank0.npz").exists(), done.stderr[-4000:]
    assert not (tmp_path / "caps.rank1.npz").exists()
    gl = GetLocal()
    with pytest.warns(CaptureWarning, match=r"rank 1 of 2 saved nothing \(caps.rank1.npz"):
        merged = gl.load(tmp_path / "caps.npz")
    assert [m.shape for m in merged[KEY]] == [(1, 4, 5, 5)] * 2
    for a, b in zip(merged[KEY], gl.load(tmp_path / "caps.npz", rank=0)[KEY]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError):
        gl.load(tmp_path / "caps.npz", rank=1)


# -- without a launcher: the environment alone makes the files per rank ---------------


def test_rank_files_from_the_environment_merge_in_rank_order(tmp_path, monkeypatch):
    np = require("numpy")
    gl = GetLocal()
    path = tmp_path / "caps.npz"
    for rank, calls in ((1, [np.full((2, 2), 1.0)]), (0, [np.zeros((1, 2)), np.ones(3)])):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert gl.save(path, {"k": calls, "only%d" % rank: [rank]}) == \
            str(tmp_path / "caps.rank{}.npz".format(rank))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    merged = gl.load(path)
    assert list(merged) == ["k", "only0", "only1"]
    assert [a.shape for a in merged["k"]] == [(1, 2), (3,), (2, 2)]
    assert merged["only1"] == [1] and gl.load(str(path), rank=1)["only1"] == [1]
    with pytest.raises(VisualizerError, match="the run had 2 processes"):
        gl.load(path, rank=2)
    gl.save(tmp_path / "one.npz", {"k": [1]})  # a single process: one plain file
    assert sorted(p.name for p in tmp_path.glob("one*")) == ["one.npz"]
    with pytest.raises(VisualizerError, match="saved by a single process"):
        gl.load(tmp_path / "one.npz", rank=0)
    with pytest.raises(VisualizerError, match="rank must be a process number"):
        gl.load(path, rank="0")


def test_a_stream_under_two_ranks_keeps_one_index_each(tmp_path, monkeypatch):
    np = require("numpy")
    gl = GetLocal()
    gl.activate()

    @gl("y")
    def f(x):
        y = np.full((2,), x)
        return y

    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        with gl.capture(stream=tmp_path / "s.vz"):
            f(10 * rank)
            f(10 * rank + 1)
    monkeypatch.delenv("RANK")
    key = f.__qualname__
    assert [float(v[0]) for v in gl.load(tmp_path / "s.vz")[key]] == [0, 1, 10, 11]
    assert [float(v[0]) for v in gl.load(tmp_path / "s.vz", rank=1)[key]] == [10, 11]
    with pytest.raises(VisualizerError, match="no value of rank 2"):
        gl.load(tmp_path / "s.vz", rank=2)
    gl.deactivate()
