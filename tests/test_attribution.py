"""visualizer.attribution on maps and gradients given by hand (NumPy; torch where said).

The captured maps' gradients against eager references are in test_gradients.py.
"""
import pytest

from conftest import require
from visualizer import VisualizerError


def layers(np, count=3, batch=2, heads=4, n=5, seed=0):
    rng = np.random.RandomState(seed)
    maps, grads = [], []
    for _ in range(count):
        scores = rng.randn(batch, heads, n, n)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        maps.append(e / e.sum(-1, keepdims=True))
        grads.append(rng.randn(batch, heads, n, n))
    return maps, grads


def test_relevance_is_the_papers_rule_written_out():
    np = require("numpy")
    from visualizer import attribution

    maps, grads = layers(np)
    got = attribution.relevance(maps, grads)
    want = np.stack([np.eye(5)] * 2)
    for a, g in zip(maps, grads):
        weighted = np.maximum(g * a, 0).mean(1)
        want = want + np.einsum("bij,bjk->bik", weighted, want)
    assert got.shape == (2, 5, 5) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # one sample without its batch axis
    np.testing.assert_allclose(attribution.relevance([a[1] for a in maps], [g[1] for g in grads]),
                               want[1], rtol=1e-12)


def test_no_positive_gradient_leaves_the_identity():
    np = require("numpy")
    from visualizer import attribution

    maps, grads = layers(np)
    r = attribution.relevance(maps, [-abs(g) for g in grads])
    np.testing.assert_array_equal(r, np.stack([np.eye(5)] * 2))
    per_layer = attribution.attention_times_gradient(maps, [-abs(g) for g in grads])
    assert len(per_layer) == 3 and not any(layer.any() for layer in per_layer)


def test_attention_times_gradient_takes_the_positive_part_per_head_then_the_mean():
    np = require("numpy")
    from visualizer import attribution

    a = np.ones((1, 2, 1, 1))
    g = np.array([1.0, -3.0]).reshape(1, 2, 1, 1)
    (layer,) = attribution.attention_times_gradient([a], [g])
    assert layer.shape == (1, 1, 1) and layer[0, 0, 0] == 0.5  # (1 + 0) / 2, not max(-1, 0)


def test_rollouts_are_the_figures_rollout_per_sample():
    np = require("numpy")
    require("matplotlib")
    from visualizer import attribution
    from visualizer.plotting import attention_rollout

    maps, grads = layers(np)
    rolled = attribution.rollout(maps)
    for b in range(2):
        np.testing.assert_allclose(rolled[b], attention_rollout(maps, sample=b), rtol=1e-6)
    weighted = [np.maximum(g * a, 0).mean(1) for a, g in zip(maps, grads)]
    by_grad = attribution.gradient_rollout(maps, grads, discard_ratio=0.2)
    for b in range(2):
        want = attention_rollout([w[b][None] for w in weighted], discard_ratio=0.2)
        np.testing.assert_allclose(by_grad[b], want, rtol=1e-6)
    np.testing.assert_allclose(by_grad.sum(-1), 1.0, rtol=1e-6)


def test_torch_in_torch_out_on_the_maps_device():
    torch = require("torch")
    np = require("numpy")
    from visualizer import attribution

    maps, grads = layers(np)
    tensors = []
    for a, g in zip(maps, grads):
        t = torch.tensor(a, dtype=torch.float32, requires_grad=True)
        t.grad = torch.tensor(g, dtype=torch.float32)
        tensors.append(t)
    r = attribution.relevance(tensors)
    assert isinstance(r, torch.Tensor) and r.dtype == torch.float32 and not r.requires_grad
    np.testing.assert_allclose(r.numpy(), attribution.relevance(maps, grads), rtol=1e-5)
    if require("matplotlib"):
        assert isinstance(attribution.gradient_rollout(tensors), torch.Tensor)


def test_bad_inputs_name_the_way_out():
    np = require("numpy")
    from visualizer import attribution

    maps, grads = layers(np)
    with pytest.raises(VisualizerError, match=r"capture\(grad=True\)"):
        attribution.relevance(maps)  # arrays have no .grad
    with pytest.raises(VisualizerError, match="list of per-layer"):
        attribution.relevance({"blocks.0.attn": maps[:1]})
    with pytest.raises(VisualizerError, match="is empty"):
        attribution.relevance([])
    with pytest.raises(VisualizerError, match="2 gradients for 3 maps"):
        attribution.relevance(maps, grads[:2])
    with pytest.raises(VisualizerError, match="encoder_decoder_relevance"):
        attribution.relevance([maps[0][..., :3, :]], [grads[0][..., :3, :]])
    with pytest.raises(VisualizerError, match="shape"):
        attribution.relevance(maps[:1], [grads[0][0]])


def test_encoder_decoder_rules_with_nothing_to_normalise():
    """A first decoder token that only attends to itself: its row of R - I is 0 and stays 0."""
    np = require("numpy")
    from visualizer import attribution

    class Map(np.ndarray):
        pass

    def with_grad(a, g):
        out = np.asarray(a, dtype=np.float64).view(Map)
        out.grad = np.asarray(g, dtype=np.float64)
        return out

    encoder = [with_grad(np.full((1, 1, 2, 2), 0.5), np.ones((1, 1, 2, 2)))]
    causal = np.array([[[[1.0, 0.0], [0.5, 0.5]]]])
    decoder = [with_grad(causal, -np.ones_like(causal))]  # no positive gradient: R_tt = I
    cross = [with_grad(np.full((1, 1, 2, 2), 0.5), np.ones((1, 1, 2, 2)))]
    result = attribution.encoder_decoder_relevance(encoder, decoder, cross)
    np.testing.assert_allclose(result["decoder"][0], np.eye(2))
    # R_ss = I + A (A all 1/2); its bar: each row of A normalised (still 1/2) plus I
    r_ss_bar = np.full((2, 2), 0.5) + np.eye(2)
    np.testing.assert_allclose(result["cross"][0], np.full((2, 2), 0.5) @ r_ss_bar)
    assert not np.isnan(result["cross"]).any()
    with pytest.raises(VisualizerError, match="one cross-attention map per decoder"):
        attribution.encoder_decoder_relevance(encoder, decoder, cross * 2)
