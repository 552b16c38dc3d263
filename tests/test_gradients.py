"""capture(grad=True): maps receive d score / d map, everything else bit for bit unchanged.

The references are independent of visualizer: timm with its fused path off
and hooks on ``attn_drop`` keeping the probabilities with ``retain_grad()``,
transformers with ``attn_implementation='eager'`` and
``output_attentions=True``, the same weights; and the relevance rule of
Chefer et al. (ICCV 2021) written out here by hand from those.  Outputs and
parameter gradients are compared with ``torch.equal`` to runs without
capture.
"""
import copy
import warnings

import pytest

from conftest import require
from visualizer import CaptureWarning, VisualizerError


@pytest.fixture
def seam(gl):
    """A get_local capturing at the kernel seam only (the other presets cost seconds here)."""
    gl.deactivate()
    gl.watch_attention(["kernel"])
    yield gl
    gl.unwatch_attention()


@pytest.fixture
def timm_preset(gl):
    """A get_local with the seam and timm's eager attention watched."""
    gl.deactivate()
    gl.watch_attention(["kernel", "timm"])
    yield gl
    gl.unwatch_attention()


def hand_relevance(torch, probs, grads):
    """R = I; R <- R + mean_h((grad * A)+) R, layer by layer (Chefer et al. 2021, eq. 6)."""
    n = probs[0].shape[-1]
    r = torch.eye(n, dtype=torch.float64).expand(probs[0].shape[0], n, n)
    for a, g in zip(probs, grads):
        weighted = (g.double() * a.double()).clamp(min=0).mean(1)
        r = r + weighted @ r
    return r


def assert_close(torch, got, want, rtol=1e-5):
    got, want = got.detach().double(), want.detach().double()
    err = float((got - want).abs().max())
    scale = float(want.abs().max())
    assert err <= rtol * scale, "max error {:.3g} against a scale of {:.3g}".format(err, scale)


def params_equal(torch, a, b):
    pairs = list(zip(a.named_parameters(), b.named_parameters()))
    assert pairs and all(na == nb for (na, _), (nb, _) in pairs)
    return all(torch.equal(pa, pb) for (_, pa), (_, pb) in pairs)


def grads_equal(torch, a, b):
    pairs = [(pa.grad, pb.grad) for pa, pb in zip(a.parameters(), b.parameters())]
    assert any(ga is not None for ga, _ in pairs)
    return all((ga is None and gb is None) or torch.equal(ga, gb) for ga, gb in pairs)


# -- the models, tiny, from config, and their eager twins -------------------------------

def tiny_vit(torch, timm):
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=5).eval()
    assert all(block.attn.fused_attn for block in model.blocks), "timm's default is fused"
    return model


def timm_reference(torch, model, x, score):
    """The eager twin: fused_attn off, the probabilities kept by hooks on attn_drop."""
    eager = copy.deepcopy(model)
    kept = []

    def keep(module, args, output):
        args[0].retain_grad()
        kept.append(args[0])

    for block in eager.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(keep)
    score(eager(x)).backward()
    return kept, [p.grad for p in kept]


def transformers_model(transformers, kind):
    configs = {
        "bert": (transformers.BertConfig, transformers.BertForSequenceClassification,
                 dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=37, num_labels=3, max_position_embeddings=64)),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
                 dict(vocab_size=99, n_embd=32, n_layer=3, n_head=4, n_positions=64)),
        "llama (grouped-query heads)": (
            transformers.LlamaConfig, transformers.LlamaForCausalLM,
            dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
    }
    config_class, model_class, fields = configs[kind]
    return model_class(config_class(**fields)).eval()


def transformers_inputs(torch, kind):
    ids = torch.tensor([[2, 5, 7, 9, 11, 13, 3], [2, 8, 6, 4, 3, 0, 0]])
    if kind == "bert":  # right padding: every query row has real keys
        return dict(input_ids=ids, attention_mask=(ids != 0).long())
    return dict(input_ids=ids[:1])


def transformers_score(kind):
    if kind == "bert":
        return lambda out: out.logits[:, 1].sum()
    return lambda out: out.logits[0, -1].log_softmax(-1)[7]  # the next token's log-probability


def transformers_reference(torch, model, inputs, score):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    out = eager(**inputs, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    score(out).backward()
    return list(out.attentions), [a.grad for a in out.attentions]


# -- the references: outputs, gradients, relevance ---------------------------------------

def test_timm_vit_fused_maps_get_the_eager_gradient_and_nothing_else_changes(seam):
    torch = require("torch")
    timm = require("timm")
    from visualizer import attribution

    model = tiny_vit(torch, timm)
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    score = (lambda logits: logits[:, 2].sum())
    expected = plain(x)
    score(expected).backward()
    probs, grads = timm_reference(torch, model, x, score)

    with seam.capture(grad=True) as cache:
        out = model(x)
    assert torch.equal(out, expected)
    score(out).backward()
    assert grads_equal(torch, model, plain)
    maps = cache["Attention.forward"]
    assert len(maps) == 3
    for got, want, grad in zip(maps, probs, grads):
        assert got.shape == (2, 4, 17, 17) and got.grad is not None
        assert_close(torch, got, want)
        assert_close(torch, got.grad, grad)
    relevance = attribution.relevance(maps)
    assert relevance.shape == (2, 17, 17)
    assert_close(torch, relevance, hand_relevance(torch, probs, grads))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama (grouped-query heads)"])
def test_transformers_sdpa_maps_get_the_eager_gradient_and_nothing_else_changes(seam, kind):
    torch = require("torch")
    transformers = require("transformers")
    from visualizer import attribution

    torch.manual_seed(0)
    model = transformers_model(transformers, kind)
    assert model.config._attn_implementation == "sdpa"
    plain = copy.deepcopy(model)
    inputs = transformers_inputs(torch, kind)
    score = transformers_score(kind)
    expected = plain(**inputs).logits
    score(plain(**inputs)).backward()
    probs, grads = transformers_reference(torch, model, inputs, score)

    with seam.capture(grad=True) as cache:
        out = model(**inputs)
    assert torch.equal(out.logits, expected)
    score(out).backward()
    assert grads_equal(torch, model, plain)
    (key,) = [k for k in cache if k.endswith("Attention.forward")]
    maps = cache[key]
    assert len(maps) == 3
    for got, want, grad in zip(maps, probs, grads):
        assert got.shape == want.shape and got.is_leaf and got.grad is not None
        assert_close(torch, got, want)
        assert_close(torch, got.grad, grad)
    relevance = attribution.relevance(maps)
    assert_close(torch, relevance, hand_relevance(torch, probs, grads))


def test_a_training_step_under_capture_updates_the_weights_exactly_as_without(seam):
    """Dropout on (the kernel's and the model's): the same seed gives the same step."""
    torch = require("torch")
    transformers = require("transformers")

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, num_labels=3,
                                     attention_probs_dropout_prob=0.2)
    model = transformers.BertForSequenceClassification(config).train()
    twin = copy.deepcopy(model)
    inputs = dict(input_ids=torch.tensor([[2, 5, 7, 9, 3], [2, 8, 6, 3, 0]]),
                  attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
                  labels=torch.tensor([0, 2]))

    def step(net, capture):
        optimiser = torch.optim.AdamW(net.parameters(), lr=1e-2)
        torch.manual_seed(1)
        with capture() as cache:
            loss = net(**inputs).loss
        loss.backward()
        optimiser.step()
        return cache

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = step(model, lambda: seam.capture(grad=True))
    assert any("dropout" in str(w.message) for w in caught)
    step(twin, _nothing)
    assert params_equal(torch, model, twin)
    assert not params_equal(torch, model, transformers.BertForSequenceClassification(config))
    maps = cache["BertSelfAttention.forward"]
    assert len(maps) == 2 and all(m.grad is not None for m in maps)


class _nothing:
    def __enter__(self):
        return {}

    def __exit__(self, *exc):
        return False


# -- the kernel seam: selections, grouped heads, masks ------------------------------------

def attention_module(torch, **kernel_kwargs):
    F = torch.nn.functional

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.project = torch.nn.Linear(8, 8)

        def forward(self, q, k, v):
            out = F.scaled_dot_product_attention(self.project(q), k, v, **kernel_kwargs)
            return out * 1.0  # a consumer of the kernel's output

    return Attention()


def only(cache):
    (values,) = cache.values()
    return values


def eager_gradient(torch, module, q, k, v, mask=None, causal=False):
    """d score / d P of ``P @ v`` with P written out (grouped heads repeated)."""
    q = module.project(q)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(),
                                    float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    probs.retain_grad()
    (probs @ v).pow(2).sum().backward()
    return probs.grad


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "bool mask": dict(mask=True),
    "grouped-query heads": dict(kv_heads=2),
    "one key/value head": dict(kv_heads=1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("selection", [None, dict(queries=[0, 3]), dict(heads=[1, 2]),
                                       dict(queries=-1, heads=3)])
def test_the_seam_gives_each_map_grad_out_times_v(seam, case, selection):
    torch = require("torch")
    spec = CASES[case]
    torch.manual_seed(0)
    kv = spec.get("kv_heads", 4)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, kv, 5, 8), torch.randn(2, kv, 5, 8)
    mask = None
    kwargs = {}
    if spec.get("mask"):
        mask = torch.rand(2, 1, 5, 5) > 0.4
        mask[..., 0] = True
        kwargs["attn_mask"] = mask
    if spec.get("causal"):
        kwargs["is_causal"] = True
    if kv not in (1, 4):
        kwargs["enable_gqa"] = True
    module = attention_module(torch, **kwargs)
    want = eager_gradient(torch, copy.deepcopy(module), q, k, v, mask, spec.get("causal"))
    with seam.capture(grad=True, **(selection or {})) as cache:
        out = module(q, k, v)
    out.pow(2).sum().backward()
    (got,) = only(cache)
    if selection:
        queries, heads = selection.get("queries"), selection.get("heads")
        rows = [queries] if isinstance(queries, int) else queries
        if rows is not None:
            want = want[:, :, rows]
        if heads is not None:
            want = want[:, [heads] if isinstance(heads, int) else heads]
    assert got.grad.shape == want.shape
    assert_close(torch, got.grad, want)


def test_off_the_seam_is_untouched_and_the_maps_are_copies(seam):
    torch = require("torch")
    module = attention_module(torch)
    q = torch.randn(1, 2, 3, 8)
    with seam.capture(store="tensor") as cache:
        out = module(q, q, q)
    assert out.grad_fn.name() == "MulBackward0"
    assert out.grad_fn.next_functions[0][0].name().startswith("ScaledDotProduct")
    assert only(cache)[0].requires_grad is False
    with seam.capture(grad=True) as cache:
        out = module(q, q, q)
    assert out.grad_fn.next_functions[0][0].name() == "_JoinBackward"


# -- eager paths: presets and your own functions ------------------------------------------

def test_timm_eager_path_keeps_the_models_own_map_with_its_gradient(timm_preset):
    seam = timm_preset
    torch = require("torch")
    timm = require("timm")
    model = tiny_vit(torch, timm)
    x = torch.randn(1, 3, 32, 32)
    probs, grads = timm_reference(torch, model, x, lambda logits: logits[0, 1])
    # the fused path, through the preset's target (the kernel supplies its unbound 'attn')
    with seam.capture(grad=True, heads=[0, 3], queries=0) as fused:
        model(x)[0, 1].backward()
    for got, grad in zip(fused["Attention.forward"], grads):
        assert got.shape == (1, 2, 1, 17) and got.is_leaf
        assert_close(torch, got.grad, grad[:, [0, 3]][:, :, [0]])
    for block in model.blocks:
        block.attn.fused_attn = False
    with seam.capture(grad=True) as cache:
        out = model(x)
    with seam.capture(grad=True, heads=[0, 3], queries=0) as picked:
        again = model(x)
    out[0, 1].backward()
    again[0, 1].backward()
    for got, one, want, grad in zip(cache["Attention.forward"], picked["Attention.forward"],
                                    probs, grads):
        assert not got.is_leaf and got.grad_fn is not None  # the model's own tensor
        assert torch.equal(got.grad, grad) or float((got.grad - grad).abs().max()) < 1e-7
        assert one.shape == (1, 2, 1, 17) and one.is_leaf
        assert torch.equal(one.grad, got.grad[:, [0, 3]][:, :, [0]])


def test_your_own_function_keeps_its_local_with_its_gradient(gl):
    torch = require("torch")
    gl.deactivate()

    @gl("attn")
    def attention(q, k, v):
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return attn @ v

    q = torch.randn(2, 3, 4, requires_grad=True)
    with gl.capture(grad=True) as cache:
        attention(q, q, q).sum().backward()
    (attn,) = cache["test_your_own_function_keeps_its_local_with_its_gradient.<locals>.attention"]
    reference = (q @ q.transpose(-2, -1)).softmax(-1)
    reference.retain_grad()
    (reference @ q).sum().backward()
    assert torch.equal(attn.grad, reference.grad)


# -- what cannot receive a gradient is said ------------------------------------------------

@pytest.mark.parametrize("options, words", [
    (dict(store="numpy"), "store='numpy'"),
    (dict(store="none"), "store='none'"),
    (dict(transform=lambda a: a[:, 0]), "transform="),
    (dict(reduce="rollout"), "reduce='rollout'"),
    (dict(stream="run.vz"), "stream='run.vz'"),
])
def test_options_that_cannot_receive_a_gradient_are_refused(gl, options, words):
    with pytest.raises(VisualizerError) as caught:
        with gl.capture(grad=True, **options):
            pass
    assert words in str(caught.value)
    with pytest.raises(VisualizerError):
        gl.configure(grad=True, **options)
    with pytest.raises(VisualizerError):
        gl.configure(grad="yes")


def test_no_grad_is_said_out_loud(seam):
    torch = require("torch")
    module = attention_module(torch)
    q = torch.randn(1, 2, 3, 8)
    with pytest.warns(CaptureWarning, match="requires no gradient"):
        with seam.capture(grad=True) as cache, torch.no_grad():
            module(q, q, q)
    assert only(cache)[0].grad is None
    assert seam.configure(grad=True)["store"] == "numpy"
    previous = seam.configure()
    assert previous["grad"] is True and previous["store"] == "graph"


def test_encoder_decoder_relevance_of_bart_follows_the_papers_rules_on_eager_maps(seam):
    """Cross-attention: Chefer et al. (ICCV 2021) eqs. 6-10, by hand on the eager maps."""
    torch = require("torch")
    transformers = require("transformers")
    from visualizer import attribution

    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=99, d_model=32, encoder_layers=2,
                                     decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=37,
                                     decoder_ffn_dim=37, max_position_embeddings=64)
    model = transformers.BartForConditionalGeneration(config).eval()
    assert model.config._attn_implementation == "sdpa"
    inputs = dict(input_ids=torch.tensor([[0, 5, 7, 9, 11, 2]]),
                  decoder_input_ids=torch.tensor([[2, 0, 8, 6]]))

    def score(out):
        return out.logits[0, -1].log_softmax(-1)[13]

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    reference = eager(**inputs, output_attentions=True)
    kept = (reference.encoder_attentions, reference.decoder_attentions,
            reference.cross_attentions)
    for maps in kept:
        for a in maps:
            a.retain_grad()
    score(reference).backward()

    with seam.capture(grad=True) as cache:
        out = model(**inputs)
    score(out).backward()
    layers = seam.by_module(model, cache)
    encoder = [layers["model.encoder.layers.{}.self_attn".format(i)][0] for i in range(2)]
    decoder = [layers["model.decoder.layers.{}.self_attn".format(i)][0] for i in range(2)]
    cross = [layers["model.decoder.layers.{}.encoder_attn".format(i)][0] for i in range(2)]
    for got, want in zip(encoder + decoder + cross, [a for maps in kept for a in maps]):
        assert_close(torch, got.grad, want.grad)
    result = attribution.encoder_decoder_relevance(encoder, decoder, cross)

    def weighted(a):
        return (a.grad.double() * a.double()).clamp(min=0).mean(1)[0]

    def bar(r):  # eqs. 8-9: R - I, rows normalised to sum to 1, plus I
        eye = torch.eye(r.shape[-1], dtype=torch.float64)
        hat = r - eye
        sums = hat.sum(-1, keepdim=True)
        # A row with nothing to spread (the first token of a causal decoder whose only
        # weight is on itself) stays 0; the paper's code divides 0 by 0 there and then
        # zeroes every NaN of the whole update.
        return hat / torch.where(sums > 0, sums, torch.ones_like(sums)) + eye

    r_ss = torch.eye(6, dtype=torch.float64)
    for a in kept[0]:
        r_ss = r_ss + weighted(a) @ r_ss
    r_tt, r_ts = torch.eye(4, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64)
    for self_map, cross_map in zip(kept[1], kept[2]):
        r_tt = r_tt + weighted(self_map) @ r_tt
        r_ts = r_ts + weighted(self_map) @ r_ts
        r_ts = r_ts + bar(r_tt).T @ weighted(cross_map) @ bar(r_ss)
    assert_close(torch, result["encoder"][0], r_ss)
    assert_close(torch, result["decoder"][0], r_tt)
    assert_close(torch, result["cross"][0], r_ts)
    assert result["cross"].shape == (1, 4, 6)


def test_a_frozen_model_is_explained_as_it_is(seam):
    """No parameter requires grad: the kernel's output does, through its maps."""
    torch = require("torch")
    timm = require("timm")
    model = tiny_vit(torch, timm).requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    with seam.capture(grad=True) as cache:
        out = model(x)
    assert out.requires_grad and torch.equal(out.detach(), model(x))
    out[0, 1].backward()
    assert all(m.grad is not None for m in cache["Attention.forward"])
    assert all(p.grad is None for p in model.parameters())
