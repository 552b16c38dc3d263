"""PyTorch's own attention layers under watch_attention(): the path torch chooses, bit for bit.

``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` (its fused layer),
``nn.TransformerEncoder`` (nested tensors), ``nn.TransformerDecoderLayer`` and
open_clip's towers keep their fast paths while capturing: every output is
compared with ``torch.equal`` to a run without capture.  The maps are compared
with references independent of visualizer: torch's own weights
(``need_weights=True, average_attn_weights=False``) on a deep copy, or a
softmax written out by hand from each module's in-projection.
"""
import contextlib
import copy
import math
import warnings

import pytest

from conftest import require

KEY = "MultiheadAttention.forward"


@pytest.fixture
def torch():
    torch = require("torch")
    with warnings.catch_warnings():
        # torch's nested tensors (its own fast path) are a prototype and say so
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")
        yield torch


def handwritten_maps(torch, attn, x, mask=None, padding=None):
    """softmax(q kᵀ / √d + mask) of self-attention from ``attn``'s packed in-projection.

    ``x`` is batch-first ``(N, L, E)``; ``mask`` an additive ``(L, L)`` mask;
    ``padding`` a boolean ``(N, L)``, True for padding keys.  Float64, per head.
    """
    n, length, embed = x.shape
    heads = attn.num_heads
    d = embed // heads
    w = attn.in_proj_weight.double()
    b = attn.in_proj_bias.double()
    x = x.double()
    q = x @ w[:embed].T + b[:embed]
    k = x @ w[embed:2 * embed].T + b[embed:2 * embed]
    q = q.view(n, length, heads, d).transpose(1, 2)
    k = k.view(n, length, heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask.double()
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1).float()


def torchs_own_maps(attn, query, key=None, **kwargs):
    """The weights per head that ``attn`` returns when asked (a deep copy of it)."""
    key = query if key is None else key
    _, weights = copy.deepcopy(attn)(query, key, key, need_weights=True,
                                     average_attn_weights=False, **kwargs)
    return weights if weights.dim() == 4 else weights.unsqueeze(0)


def assert_maps(np, got, expected, rows=None):
    """``got`` (NumPy, ``(N, H, L, S)``) equals ``expected`` to 1e-5, on the query ``rows``."""
    expected = expected.detach().numpy()
    assert got.shape == expected.shape
    if rows is not None:  # (N, L) True for the rows compared
        got, expected = got.transpose(0, 2, 1, 3)[rows], expected.transpose(0, 2, 1, 3)[rows]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# -- nn.MultiheadAttention on its fast path -------------------------------------------


@contextlib.contextmanager
def python_path(torch):
    """torch's Python path only: no fused operator, no nested tensors (references)."""
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def native_ops(torch, module, *args, **kwargs):
    """The fused operators ``module(*args)`` runs, read by torch's profiler."""
    wanted = {"aten::_native_multi_head_attention", "aten::_transformer_encoder_layer_fwd",
              "aten::_nested_tensor_from_mask"}
    with torch.no_grad(), torch.autograd.profiler.profile() as profile:
        module(*args, **kwargs)
    return {event.name for event in profile.function_events} & wanted


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_multihead_attention_on_its_fast_path(seam, torch, need_weights, masked):
    np = require("numpy")
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    x = torch.randn(3, 7, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = padding[2, 2:] = True
    kwargs = {"need_weights": need_weights}
    if masked:
        kwargs["key_padding_mask"] = padding
    assert native_ops(torch, mha, x, x, x, **kwargs) == {"aten::_native_multi_head_attention"}
    with torch.no_grad():
        plain = mha(x, x, x, **kwargs)
        with seam.capture() as cache:
            got = mha(x, x, x, **kwargs)
    assert torch.equal(got[0], plain[0])
    assert (got[1] is None) if not need_weights else torch.equal(got[1], plain[1])
    assert list(cache) == [KEY]
    (maps,) = cache[KEY]
    assert_maps(np, maps, handwritten_maps(torch, mha, x, padding=padding if masked else None))


def test_multihead_attention_with_a_nested_tensor(seam, torch):
    np = require("numpy")
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    nested = torch.nested.nested_tensor([x[0, :4], x[1]])
    with torch.no_grad():
        plain = mha(nested, nested, nested, need_weights=False)[0]
        with seam.capture() as cache:
            got = mha(nested, nested, nested, need_weights=False)[0]
    assert all(torch.equal(a, b) for a, b in zip(got.unbind(), plain.unbind()))
    (maps,) = cache[KEY]
    padding = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    # The missing tokens of the shorter sequence: zero rows, zero columns.
    assert_maps(np, maps, handwritten_maps(torch, mha, x, padding=padding), rows=(~padding).numpy())
    assert not maps[0, :, 4:].any()


# Configurations that torch runs on its Python path, where need_weights=True computes
# the weights in Python (no kernel call): the maps are computed beside the module.
PYTHON_PATH = {
    "sequence first": dict(module={}, batch_first=False),
    "kdim and vdim": dict(module={"kdim": 12, "vdim": 20}),
    "add_bias_kv": dict(module={"add_bias_kv": True}),
    "add_zero_attn": dict(module={"add_zero_attn": True}),
    "bias_kv, zero attn, masks": dict(module={"add_bias_kv": True, "add_zero_attn": True},
                                      masks=True),
    "no bias": dict(module={"bias": False}),
    "odd heads": dict(module={"num_heads": 3}),
    "float masks": dict(module={}, masks="float"),
    "3-d mask": dict(module={}, masks="3d"),
    "unbatched": dict(module={}, unbatched=True),
    "cross-attention": dict(module={}, cross=True),
}


@pytest.mark.parametrize("case", list(PYTHON_PATH))
def test_multihead_attention_options_match_torchs_own_weights(seam, torch, case):
    np = require("numpy")
    spec = PYTHON_PATH[case]
    options = dict(spec["module"])
    heads = options.pop("num_heads", 4)
    batch_first = spec.get("batch_first", True)
    torch.manual_seed(2)
    mha = torch.nn.MultiheadAttention(24, heads, batch_first=batch_first, **options).eval()
    n, length, keys = 2, 5, 6 if spec.get("cross") or "kdim" in options else 5
    query = torch.randn(n, length, 24)
    key = torch.randn(n, keys, options.get("kdim", 24))
    value = torch.randn(n, keys, options.get("vdim", 24)) if "vdim" in options else key
    if not (spec.get("cross") or "kdim" in options):
        key = value = query
    kwargs = {}
    masks = spec.get("masks")
    if masks:
        padding = torch.zeros(n, keys, dtype=torch.bool)
        padding[1, -2:] = True
        causal = torch.ones(length, keys, dtype=torch.bool).triu(1)
        if masks == "float":
            padding = torch.zeros(n, keys).masked_fill(padding, -1e4)
            causal = torch.randn(length, keys)
        if masks == "3d":
            causal = causal.expand(n * heads, length, keys).clone()
            causal[heads:, 0, 1] = True  # another mask for the second sequence
        kwargs = {"key_padding_mask": padding, "attn_mask": causal}
    if spec.get("unbatched"):
        query, key, value = query[0], key[0], value[0]
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    with torch.no_grad():
        plain = mha(query, key, value, **kwargs)  # need_weights=True, averaged over heads
        plain_without = mha(query, key, value, need_weights=False, **kwargs)[0]
        with seam.capture() as cache:
            got = mha(query, key, value, **kwargs)
            without_weights = mha(query, key, value, need_weights=False, **kwargs)[0]
        expected = copy.deepcopy(mha)(query, key, value, need_weights=True,
                                      average_attn_weights=False, **kwargs)[1]
    if expected.dim() == 3:
        expected = expected.unsqueeze(0)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    assert torch.equal(without_weights, plain_without)
    beside, from_the_kernel = cache[KEY]
    assert_maps(np, beside, expected)
    assert_maps(np, from_the_kernel, expected)


def test_weights_per_head_are_torchs_own(seam, torch):
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        plain = mha(x, x, x, average_attn_weights=False)
        with seam.capture() as cache:
            got = mha(x, x, x, average_attn_weights=False)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    assert (cache[KEY][0] == plain[1].numpy()).all()


def test_graph_storage_keeps_the_maps_differentiable(seam, torch):
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        plain = mha(x, x, x, need_weights=False)[0]
        with seam.capture(store="graph") as cache:
            got = mha(x, x, x, need_weights=False)[0]
    assert torch.equal(got, plain)
    (maps,) = cache[KEY]
    maps[:, :, 0, 0].sum().backward()
    assert mha.in_proj_weight.grad is not None and mha.in_proj_weight.grad.abs().sum() > 0


# -- the transformer layers ----------------------------------------------------------


def encoder_layer_inputs(torch, encoder, x, padding):
    """The input each layer of ``encoder`` (a deep copy) receives on torch's Python path."""
    inputs, hooks = [], []
    for layer in encoder.layers:
        hooks.append(layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0])))
    with torch.no_grad(), python_path(torch):
        encoder(x, src_key_padding_mask=padding)
    for hook in hooks:
        hook.remove()
    return inputs


@pytest.mark.parametrize("padded", ["none", "one sequence", "every sequence"])
def test_transformer_encoder_keeps_its_nested_fast_path(seam, torch, padded):
    np = require("numpy")
    nn = torch.nn
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 8, 32)
    padding = None
    if padded != "none":
        padding = torch.zeros(3, 8, dtype=torch.bool)
        padding[1, 5:] = padding[2, 3:] = True
        if padded == "every sequence":
            padding[0, 7:] = True
    reference = copy.deepcopy(encoder)
    classes = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)
    own = [vars(cls)["forward"] for cls in classes]
    with torch.no_grad():
        plain = encoder(x, src_key_padding_mask=padding)
        with seam.capture() as cache:
            out = encoder(x, src_key_padding_mask=padding)
    assert [vars(cls)["forward"] for cls in classes] == own  # off means absent
    assert torch.equal(out, plain)
    if padding is not None:  # the nested path ran: nothing where the padding was
        assert not out[padding].any()
    maps = cache[KEY]
    assert [m.shape for m in maps] == [(3, 4, 8, 8)] * 2
    assert list(seam.by_module(encoder, cache)) == ["layers.0.self_attn", "layers.1.self_attn"]
    inputs = encoder_layer_inputs(torch, reference, x, padding)
    rows = None if padding is None else (~padding).numpy()
    for got, layer, h in zip(maps, reference.layers, inputs):
        with torch.no_grad(), python_path(torch):
            expected = torchs_own_maps(layer.self_attn, h, key_padding_mask=padding)
        assert_maps(np, got, expected, rows)
        if padding is not None:  # padded tokens do not exist on the nested path
            assert not got.transpose(0, 2, 1, 3)[~rows].any()


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_fused_path_with_masks(seam, torch, norm_first):
    np = require("numpy")
    nn = torch.nn
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True,
                                       norm_first=norm_first, activation="gelu").eval()
    x = torch.randn(2, 6, 32)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    kwargs = {"src_mask": causal, "src_key_padding_mask": padding}
    assert "aten::_transformer_encoder_layer_fwd" in native_ops(torch, layer, x, **kwargs)
    with torch.no_grad():
        plain = layer(x, **kwargs)
        with seam.capture() as cache:
            out = layer(x, **kwargs)
        attention_input = layer.norm1(x) if norm_first else x
        expected = handwritten_maps(torch, layer.self_attn, attention_input,
                                    torch.zeros(6, 6).masked_fill(causal, float("-inf")), padding)
    assert torch.equal(out, plain)
    (maps,) = cache[KEY]
    assert_maps(np, maps, expected)
    assert list(seam.by_module(layer, cache)) == ["self_attn"]


def test_transformer_decoder_layer(seam, torch):
    np = require("numpy")
    nn = torch.nn
    torch.manual_seed(5)
    decoder = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True),
        num_layers=2).eval()
    tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    memory_padding = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    kwargs = {"memory_key_padding_mask": memory_padding}
    reference = copy.deepcopy(decoder)
    with torch.no_grad():
        plain = decoder(tgt, memory, **kwargs)
        with seam.capture() as cache:
            out = decoder(tgt, memory, **kwargs)
    assert torch.equal(out, plain)
    names = list(seam.by_module(decoder, cache))
    assert names == ["layers.0.self_attn", "layers.0.multihead_attn",
                     "layers.1.self_attn", "layers.1.multihead_attn"]
    seen = []  # every attention call of the copy: (module, query)
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0])))
             for m in reference.modules() if isinstance(m, nn.MultiheadAttention)]
    with torch.no_grad():
        reference(tgt, memory, **kwargs)
        for (attn, query), got in zip(seen, cache[KEY]):
            cross = attn in [layer.multihead_attn for layer in reference.layers]
            expected = torchs_own_maps(attn, query, memory if cross else None,
                                       key_padding_mask=memory_padding if cross else None)
            assert_maps(np, got, expected)
    for hook in hooks:
        hook.remove()


# -- open_clip ------------------------------------------------------------------------


def test_open_clip_towers_keep_their_bits(seam, torch):
    np = require("numpy")
    open_clip = require("open_clip")
    torch.manual_seed(6)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    image = torch.randn(1, 3, 224, 224)
    text = torch.randint(1, 1000, (2, 77))
    # Each block's attention input (ln_1 of its input) and mask, read by hooks in the
    # run without capture (hooks change no path of nn.MultiheadAttention).
    seen = []
    hooks = [m.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((m, args[0], kwargs.get("attn_mask"))),
        with_kwargs=True) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    with torch.no_grad():
        plain = model.encode_image(image), model.encode_text(text)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        with seam.capture() as cache:
            got = model.encode_image(image), model.encode_text(text)
    assert torch.equal(got[0], plain[0])
    assert torch.equal(got[1], plain[1])
    maps = cache[KEY]
    assert len(maps) == len(seen) == 24
    assert [m.shape for m in maps] == [(1, 12, 50, 50)] * 12 + [(2, 8, 77, 77)] * 12
    with torch.no_grad():
        for (attn, x, mask), got in zip(seen, maps):
            assert_maps(np, got, handwritten_maps(torch, attn, x, mask))
    assert list(seam.by_module(model.visual, cache))[:2] == [
        "transformer.resblocks.0.attn", "transformer.resblocks.1.attn"]


# -- the seed's example: maps read with hooks and need_weights=True --------------------


class Classifier:
    """A small text classifier on ``nn.TransformerEncoderLayer``, as the seed's notebook has one."""

    def __new__(cls, torch, layers=2):
        nn = torch.nn

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(100, 64)
                self.encoder = nn.ModuleList(
                    nn.TransformerEncoderLayer(64, 8, 128, dropout=0.1, batch_first=True)
                    for _ in range(layers))
                self.head = nn.Linear(64, 3)

            def forward(self, tokens, padding=None):
                x = self.embed(tokens)
                for layer in self.encoder:
                    x = layer(x, src_key_padding_mask=padding)
                return self.head(x.mean(1))

        return Model()


def maps_with_hooks(torch, model, *args):
    """The seed's recipe: every self_attn asked for weights per head, read by a forward hook."""
    maps, hooks = [], []

    def ask_for_weights(module, args, kwargs):
        kwargs["need_weights"] = True
        kwargs["average_attn_weights"] = False
        return args, kwargs

    for layer in model.encoder:
        hooks.append(layer.self_attn.register_forward_pre_hook(ask_for_weights, with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(lambda m, i, out: maps.append(out[1])))
    with torch.no_grad():
        out = model(*args)
    for hook in hooks:
        hook.remove()
    return out, maps


def test_the_seeds_hooked_maps_are_the_maps_watch_attention_captures(seam, torch):
    np = require("numpy")
    torch.manual_seed(7)
    model = Classifier(torch).eval()
    tokens = torch.randint(0, 100, (4, 10))
    padding = torch.zeros(4, 10, dtype=torch.bool)
    padding[2, 7:] = padding[3, 4:] = True
    for args in ((tokens,), (tokens, padding)):
        hooked_out, hooked = maps_with_hooks(torch, copy.deepcopy(model), *args)
        with torch.no_grad():
            plain = model(*args)
            with seam.capture() as cache:
                out = model(*args)
        assert torch.equal(out, plain)  # the hooks themselves turn the fused layer off
        torch.testing.assert_close(hooked_out, plain)
        maps = cache[KEY]
        assert len(maps) == len(hooked) == 2
        rows = None if len(args) == 1 else (~padding).numpy()
        for got, expected in zip(maps, hooked):
            assert_maps(np, got, expected, rows)
