"""The mathematics of maps (``visualizer.attention``), each function against a reference written out here.

References are loops over plain Python numbers and NumPy, the formulas as the
papers write them; none calls the function it checks.  Torch cases run where
torch is installed (``require`` skips them in the core environments).
"""
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, require
from visualizer import VisualizerError, attention


def softmax_maps(shape, seed=0):
    """Random attention probabilities of ``shape`` (rows sum to 1)."""
    scores = np.random.default_rng(seed).normal(size=shape) * 2
    weights = np.exp(scores)
    return weights / weights.sum(-1, keepdims=True)


# --------------------------------------------------------------------------- references


def reference_a_hat(layer):
    """Abnar & Zuidema's Â for one (heads, N, N) layer: rownorm(0.5 · mean_heads(A) + 0.5 · I), by loops."""
    heads, n = layer.shape[0], layer.shape[-1]
    a_hat = np.zeros((n, n))
    for i in range(n):
        row = [0.5 * sum(layer[h, i, j] for h in range(heads)) / heads + (0.5 if i == j else 0.0)
               for j in range(n)]
        total = sum(row)
        for j in range(n):
            a_hat[i, j] = row[j] / total
    return a_hat


def reference_product(left, right):
    """The matrix product by its definition."""
    n, m, k = left.shape[0], left.shape[1], right.shape[1]
    return np.array([[sum(left[i, t] * right[t, j] for t in range(m)) for j in range(k)]
                     for i in range(n)])


def reference_rollout(layers):
    """R_l = Â_l · R_{l-1}, R_0 = I: the rollout after each layer, first layer first."""
    out, result = [], None
    for layer in layers:
        a_hat = reference_a_hat(layer)
        result = a_hat if result is None else reference_product(a_hat, result)
        out.append(result)
    return out


# --------------------------------------------------------------------------- rollout


def test_rollout_is_the_product_of_the_residual_normalised_head_means():
    layers = [softmax_maps((3, 5, 5), seed=s) for s in range(3)]
    want = reference_rollout(layers)
    np.testing.assert_allclose(attention.rollout(layers), want[-1], rtol=1e-12)
    every = attention.rollout(np.stack(layers), each=True)
    assert every.shape == (3, 5, 5)
    np.testing.assert_allclose(every, np.stack(want), rtol=1e-12)


def test_rollout_fusions_discard_and_no_residual_follow_their_definitions():
    layer = softmax_maps((4, 4, 4), seed=7)
    for fusion, pick in (("max", max), ("min", min)):
        fused = np.array([[pick(layer[h, i, j] for h in range(4)) for j in range(4)]
                          for i in range(4)])
        want = (fused + np.eye(4)) / (fused + np.eye(4)).sum(-1, keepdims=True)
        np.testing.assert_allclose(attention.rollout([layer], head_fusion=fusion), want,
                                   rtol=1e-12)
    # discard_ratio=0.25 zeroes the 4 lowest of the 16 fused weights; no residual: rownorm alone
    fused = layer.mean(0)
    lowest = sorted(range(16), key=lambda f: fused.flat[f])[:4]
    kept = fused.copy()
    for f in lowest:
        kept.flat[f] = 0.0
    want = kept / kept.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        attention.rollout([layer], discard_ratio=0.25, residual=False), want, rtol=1e-12)


def test_rollout_warns_of_rows_left_without_attention():
    layer = np.zeros((1, 3, 3))
    layer[0, 0, 1] = 1.0
    with pytest.warns(UserWarning, match="layer 0 leaves 2 rows with no attention"):
        got = attention.rollout([layer], residual=False)
    np.testing.assert_array_equal(got, [[0, 1, 0], [0, 0, 0], [0, 0, 0]])


def test_rollout_step_in_blocks_of_rows_equals_the_whole_step():
    layers = [softmax_maps((2, 6, 6), seed=s) for s in range(2)]
    want = reference_rollout(layers)
    before = want[0]
    fused = layers[1].mean(0)
    rows = [attention.rollout_step(fused[start:start + 4], before, start)
            for start in range(0, 6, 4)]
    np.testing.assert_allclose(np.concatenate(rows), want[1], rtol=1e-12)


def test_rownorm_divides_each_row_by_its_sum_and_leaves_empty_rows():
    rows = np.array([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    want = [[r / sum(row) if sum(row) > 0 else r for r in row] for row in rows.tolist()]
    np.testing.assert_array_equal(attention.rownorm(rows), want)


def test_rollout_errors_name_the_choices():
    with pytest.raises(VisualizerError, match="unknown head_fusion 'median'"):
        attention.rollout([np.eye(2)[None]], head_fusion="median")
    with pytest.raises(VisualizerError, match=r"discard_ratio in \[0, 1\), got 1.0"):
        attention.rollout([np.eye(2)[None]], discard_ratio=1.0)


# --------------------------------------------------------------------------- reductions


def reference_reductions(maps, queries, heads):
    """head_mean and received of (B, H, Q, K) maps, by loops over the picked heads and rows."""
    b, _, _, k = maps.shape
    head_mean = np.array([[[sum(maps[s, h, q, j] for h in heads) / len(heads) for j in range(k)]
                           for q in queries] for s in range(b)])
    received = np.array([[[sum(maps[s, h, q, j] for q in queries) for j in range(k)]
                          for h in heads] for s in range(b)])
    return head_mean, received


@pytest.mark.parametrize("queries, heads", [(None, None), (-1, None), (slice(1, 6), [0, 2]),
                                            ([4, 0], 1)])
def test_reduce_map_head_mean_and_received_in_chunks(queries, heads):
    maps = softmax_maps((2, 3, 7, 7), seed=3)
    rows = list(range(7))[queries] if isinstance(queries, slice) else (
        list(range(7)) if queries is None else [q % 7 for q in np.atleast_1d(queries)])
    picked = list(range(3)) if heads is None else list(np.atleast_1d(heads))
    head_mean, received = reference_reductions(maps, rows, picked)
    for chunk in (None, 2):
        got = attention.reduce_map(maps, "head_mean", queries, heads, rows_per_chunk=chunk)
        np.testing.assert_allclose(got, head_mean, rtol=1e-12)
        got = attention.reduce_map(maps, "received", queries, heads, rows_per_chunk=chunk)
        np.testing.assert_allclose(got, received, rtol=1e-12)


def test_reduce_map_rollout_runs_through_the_layers_of_a_forward():
    layers = [softmax_maps((1, 2, 5, 5), seed=s) for s in range(3)]
    want = reference_rollout([layer[0] for layer in layers])
    running, owners = {}, [object(), object(), object()]
    for layer, owner, expected in zip(layers, owners, want):
        got = attention.reduce_map(layer, "rollout", running=running, owner=owner,
                                   rows_per_chunk=2)
        np.testing.assert_allclose(got[0], expected, rtol=1e-12)
    # the first module again: a new forward, whose rollout starts from the identity
    got = attention.reduce_map(layers[1], "rollout", queries=0, running=running,
                               owner=owners[0])
    np.testing.assert_allclose(got[0], reference_rollout([layers[1][0]])[0][:1], rtol=1e-12)


def test_reductions_refuse_what_they_cannot_do():
    assert attention.check_reduce(None, optional=True) is None
    with pytest.raises(VisualizerError, match="reduce must be one of 'head_mean', 'received', "
                                              "'rollout', got 'max'"):
        attention.reduce_map(np.eye(3)[None], "max")
    with pytest.raises(VisualizerError, match="1 queries against 5 keys"):
        attention.reduce_map(np.full((2, 1, 5), 0.2), "rollout")


def test_reductions_of_tensors_stay_tensors_in_float32():
    torch = require("torch")
    maps = softmax_maps((2, 3, 6, 6), seed=5)
    half = torch.tensor(maps, dtype=torch.bfloat16)
    exact = half.double().numpy()  # the values the tensor holds, rounded to bfloat16
    head_mean, received = reference_reductions(exact, range(6), range(3))
    for reduce, want in (("head_mean", head_mean), ("received", received),
                         ("rollout", np.stack([reference_rollout([m])[0] for m in exact]))):
        got = attention.reduce_map(half, reduce, rows_per_chunk=4)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32, reduce
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6,
                                   err_msg=reduce)


# --------------------------------------------------------------------------- selections


def test_check_selection_keeps_ints_slices_and_sequences_and_refuses_the_rest():
    assert attention.check_selection(None, "queries") is None
    assert attention.check_selection(-1, "queries") == -1
    assert attention.check_selection(slice(0, 4), "heads") == slice(0, 4)
    assert attention.check_selection([0, 5], "heads") == (0, 5)
    assert attention.check_selection(range(2), "heads") == (0, 1)
    for bad in (True, "0", 1.5, [], [0, "1"], [True]):
        with pytest.raises(VisualizerError, match=r"heads must be an int, a slice.*heads=\[0, 5\]"):
            attention.check_selection(bad, "heads")


@pytest.mark.parametrize("selection", [0, -1, 3, slice(None), slice(1, None, 2), slice(-2, None),
                                       [3, 0, -4], (1,)])
def test_positions_are_what_python_indexing_picks(selection):
    items = list(range(4))
    if isinstance(selection, slice):
        want = items[selection]
    else:
        want = [items[i] for i in ([selection] if isinstance(selection, int) else selection)]
    assert attention.positions(selection, 4, "queries") == want


def test_positions_out_of_range_say_which():
    with pytest.raises(IndexError, match=r"heads=\[0, 4\]: position 4 is out of range for 4 heads"):
        attention.positions([0, 4], 4, "heads")


def test_select_picks_rows_then_heads_keeping_the_axes():
    maps = softmax_maps((2, 4, 5, 5), seed=1)
    got = attention.select(maps, queries=-1, heads=[2, 0])
    want = np.array([[[maps[s, h, 4, :] for _ in (0,)] for h in (2, 0)] for s in range(2)])
    np.testing.assert_array_equal(got, want)
    assert attention.select(3.0, 0, 0) == 3.0  # not a map: as it is


# --------------------------------------------------------------------------- grids


def reference_grid(n, most=16):
    """The smallest prefix p <= most with n - p a perfect square, by trying every side."""
    for prefix in range(0, min(most, n - 1) + 1):
        for side in range(1, n + 1):
            if side * side == n - prefix:
                return (side, side), prefix
    return None


def test_patch_grid_finds_the_smallest_prefix_that_leaves_a_square():
    for n in range(2, 300):
        want = reference_grid(n)
        if want is None:
            with pytest.raises(VisualizerError, match="cannot infer a square patch grid from {} "
                                                      "tokens".format(n)):
                attention.patch_grid(n)
        else:
            assert attention.patch_grid(n) == want, n


def test_patch_grid_with_grid_or_prefix_given():
    assert attention.patch_grid(21, grid=4) == ((4, 4), 5)
    assert attention.patch_grid(25, grid=(4, 6)) == ((4, 6), 1)
    assert attention.patch_grid(21, num_prefix_tokens=5) == ((4, 4), 5)
    assert attention.patch_grid(21, grid=(4, 4), num_prefix_tokens=5) == ((4, 4), 5)
    for kwargs, message in (({"grid": 5}, "25 patches and does not fit attention over 17"),
                            ({"grid": 4, "num_prefix_tokens": 0}, "fix grid or num_prefix_tokens"),
                            ({"num_prefix_tokens": 17}, "num_prefix_tokens=17 does not fit"),
                            ({"num_prefix_tokens": 0}, "17 tokens minus 0 prefix tokens"),
                            ({"grid": (0, 4)}, "positive patch grid")):
        with pytest.raises(VisualizerError, match=re.escape(message)):
            attention.patch_grid(17, **kwargs)
    with pytest.raises(VisualizerError, match="patch grid as an int or a"):
        attention.parse_grid("4x4")


# --------------------------------------------------------------------------- to NumPy


def test_plain_values_pass_through_and_lists_become_arrays():
    value = [[0.25, 0.75]]
    assert attention.to_numpy(value) is value
    assert attention.is_tensor(value) is False
    array = attention.as_array(value, dtype="float32")
    assert array.dtype == np.float32 and array.tolist() == value
    with pytest.raises(VisualizerError, match="expected the maps as a NumPy array"):
        attention.as_array(object(), "the maps")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_tensors_become_detached_numpy_copies_and_half_precisions_float32(dtype):
    torch = require("torch")
    tensor = torch.tensor([[0.5, 0.25], [0.125, 1.0]], dtype=getattr(torch, dtype),
                          requires_grad=True)
    got = attention.to_numpy(tensor * 1)  # a result in the graph, as captured
    want = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32,
            "float64": np.float64}[dtype]
    assert isinstance(got, np.ndarray) and got.dtype == want
    assert got.tolist() == [[0.5, 0.25], [0.125, 1.0]]
    source = torch.ones(3)
    copy = attention.to_numpy(source)
    source.add_(1)  # the model changes its tensor after the capture
    assert copy.tolist() == [1.0, 1.0, 1.0]
    assert attention.as_array(tensor).dtype == np.float64


def test_sample_maps_takes_one_sample_and_refuses_bad_maps():
    batch = softmax_maps((3, 2, 4, 4))
    np.testing.assert_array_equal(attention.sample_maps(batch, sample=-1), batch[2])
    assert attention.sample_maps(np.eye(3)).shape == (1, 3, 3)
    for value, kwargs, message in (
            (batch, {"sample": 3}, "sample=3 is out of range"),
            (np.zeros(4), {}, "got shape (4,)"),
            (np.zeros((1, 3, 4)), {}, "as many queries as keys"),
            (np.full((1, 2, 2), np.nan), {}, "NaN or inf (first at index (0, 0, 0)")):
        with pytest.raises(VisualizerError, match=re.escape(message)):
            attention.sample_maps(value, **kwargs)
    assert attention.sample_maps(np.zeros((1, 3, 4)), square=False).shape == (1, 3, 4)


def test_importing_attention_imports_neither_numpy_nor_torch():
    code = ("import sys, visualizer, visualizer.attention, visualizer.storage.memory; "
            "print('numpy' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]



def test_why_not_maps_names_what_is_not_a_square_map():
    np = pytest.importorskip("numpy")
    from visualizer.attention import why_not_maps

    assert why_not_maps(np.zeros((2, 3, 4, 4))) is None
    assert why_not_maps(np.zeros((3, 4, 4))) is None and why_not_maps(np.zeros((4, 4))) is None
    assert why_not_maps([[0.5, 0.5]]) == "a list, not an array"
    assert "not (batch, heads, N, N)" in why_not_maps(np.zeros(4))
    assert "not one N x N map" in why_not_maps(np.zeros((2, 4, 5)))
    assert "not one N x N map" in why_not_maps(np.zeros((0, 0)))
    assert why_not_maps(np.array([["a", "b"], ["c", "d"]])) == "dtype <U1, not numbers"
    assert why_not_maps(np.zeros((2, 1, 3, 3)), sample=2) == "a batch of 2, which has no sample 2"
    assert why_not_maps(np.zeros((2, 1, 3, 3)), sample=-2) is None
