"""Continuous batching (transformers' ``generate_batch``): attention maps per request.

Each forward of a continuous batch packs the tokens of several requests into
one batch row, so one attention call holds the maps of every request glued
together along a block-diagonal mask.  visualizer splits each call per
request (``integrations.transformers.packed_requests``) and keys the maps by
request id.  The reference is never our own code: each request is run alone
through transformers' eager ``generate(output_attentions=True)``, and its
steps, stitched, must equal the request's captured steps, stitched.  Both
paths continuous batching runs on CPU are covered: ``'sdpa'`` (the kernel
seam) and ``'paged|eager'`` (its eager softmax).  Tiny random Llama with
grouped-query attention, built from a config, offline.
"""
import copy
import warnings

import numpy as np
import pytest

from conftest import require
from visualizer import CaptureWarning, VisualizerError
from visualizer.generation import requests, steps_by_module, stitch

ATOL = 1e-5
PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]  # three lengths
NEW_TOKENS = 4
IMPLEMENTATIONS = ["sdpa", "paged|eager"]


def _transformers():
    t = require("transformers")
    try:
        from transformers.generation import continuous_batching  # noqa: F401
    except ImportError as exc:
        pytest.skip("transformers {} has no continuous batching: {}".format(t.__version__, exc))
    if not hasattr(t.GenerationMixin, "generate_batch"):
        pytest.skip("transformers {} has no generate_batch".format(t.__version__))
    return t


def _models(implementation):
    """The same tiny Llama (GQA: 4 heads, 2 key/value heads) twice: for batching, and eager."""
    torch = require("torch")
    t = _transformers()
    torch.manual_seed(0)
    config = t.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, pad_token_id=0, eos_token_id=None,
                           bos_token_id=1)
    model = t.LlamaForCausalLM._from_config(config, attn_implementation=implementation).eval()
    # a config of its own: transformers 5.23 writes the implementation into the one it gets
    eager = t.LlamaForCausalLM._from_config(copy.deepcopy(config),
                                            attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    return model, eager


def _generation_config():
    t = _transformers()
    return t.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              pad_token_id=0)


def _batch(model):
    """Run the prompts through continuous batching: ``{request id: generated tokens}``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # 'paged|' deprecations
        out = model.generate_batch(PROMPTS, generation_config=_generation_config())
    assert all(result.error is None for result in out.values()), out
    return {request: list(result.generated_tokens) for request, result in out.items()}


def _alone(eager, prompt):
    """One prompt alone through eager generate(): (generated tokens, per-layer step maps)."""
    torch = require("torch")
    with torch.no_grad():
        out = eager.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                             do_sample=False, output_attentions=True,
                             return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    layers = len(out.attentions[0])
    return tokens, [[step[layer] for step in out.attentions] for layer in range(layers)]


def _request_of(prompt_index, batched):
    """The request id generate_batch gave the prompt at ``prompt_index`` (ids in input order)."""
    return list(batched)[prompt_index]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_each_requests_maps_equal_that_request_alone_through_eager_generate(implementation,
                                                                            seam):
    model, eager = _models(implementation)
    plain = _batch(model)
    with seam.capture() as cache:
        captured = _batch(model)
    assert captured == plain  # the tokens, unchanged with capture on
    ids = requests(cache)
    assert sorted(ids) == sorted(plain)
    for index, prompt in enumerate(PROMPTS):
        request = _request_of(index, plain)
        tokens, reference = _alone(eager, prompt)
        assert tokens == plain[request], "continuous batching and generate() disagree"
        steps = steps_by_module(model, cache, request=request)
        assert sorted(steps) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        for layer in range(2):
            mine = steps["model.layers.{}.self_attn".format(layer)]
            assert [m.shape for m in mine] == [tuple(r.shape) for r in reference[layer]]
            assert mine[0].shape == (1, 4, len(prompt), len(prompt))
            np.testing.assert_allclose(stitch(mine), stitch(reference[layer]), atol=ATOL,
                                       rtol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_last_query_row_per_request(implementation, seam):
    model, eager = _models(implementation)
    with seam.capture(queries=-1) as cache:
        batched = _batch(model)
    for index, prompt in enumerate(PROMPTS):
        _, reference = _alone(eager, prompt)
        steps = steps_by_module(model, cache, request=_request_of(index, batched))
        rows = stitch(steps["model.layers.1.self_attn"])
        full = stitch(reference[1])
        assert rows.shape == (1, 4, NEW_TOKENS, len(prompt) + NEW_TOKENS - 1)
        np.testing.assert_allclose(rows, full[:, :, len(prompt) - 1:], atol=ATOL, rtol=0)


def test_requests_need_naming_and_keep_their_ids_in_a_file(seam, tmp_path):
    model, _ = _models("sdpa")
    with seam.capture() as cache:
        batched = _batch(model)
    with pytest.raises(VisualizerError, match="request="):
        steps_by_module(model, cache)
    with pytest.raises(VisualizerError, match="no maps of request 'nope'"):
        steps_by_module(model, cache, request="nope")
    named = seam.by_module(model, cache)
    assert "model.layers.0.self_attn[{}]".format(list(batched)[0]) in named
    path = seam.save(str(tmp_path / "batch.npz"), cache)
    loaded = seam.load(path)
    assert sorted(requests(loaded)) == sorted(batched)
    for key in cache:
        assert len(loaded[key]) == len(cache[key])


def test_a_packed_call_whose_requests_are_unknown_is_kept_whole_and_said(seam):
    """A packed call outside a continuous batch's runner: no request ids to split by."""
    torch = require("torch")
    _transformers()
    from transformers.integrations import sdpa_attention

    from visualizer.integrations import transformers as integration

    model, _ = _models("sdpa")
    module = model.model.layers[0].self_attn
    torch.manual_seed(1)
    q = torch.randn(1, 4, 8, 8)
    k, v = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)  # 2 key/value heads
    mask = torch.zeros(1, 1, 8, 8)
    lengths = torch.tensor([0, 3, 8], dtype=torch.int32)
    integration._packed_warned.discard("sdpa_attention_forward")
    with seam.capture() as cache, pytest.warns(CaptureWarning, match="could not be told apart"):
        sdpa_attention_forward = sdpa_attention.sdpa_attention_forward
        sdpa_attention_forward(module, q, k, v, mask, cu_seq_lens_q=lengths,
                               cu_seq_lens_k=lengths)
    # called from no module's method: under the kernel's own name, packed, whole
    assert [m.shape for m in cache["scaled_dot_product_attention"]] == [(1, 4, 8, 8)]
    assert requests(cache) == []


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_prompt_prefilled_in_chunks_is_stitched_as_one_prompt(implementation, seam):
    """A 40-token prompt in batches of at most 16 tokens: prefilled over three forwards."""
    t = _transformers()
    config_class = getattr(t, "ContinuousBatchingConfig", None) or getattr(
        t.generation.configuration_utils, "ContinuousBatchingConfig", None)
    if config_class is None:
        pytest.skip("transformers {} has no ContinuousBatchingConfig".format(t.__version__))
    model, eager = _models(implementation)
    prompt = list(range(1, 41))
    with seam.capture() as cache, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        out = model.generate_batch([prompt, [6, 7, 8]], generation_config=_generation_config(),
                                   continuous_batching_config=config_class(max_batch_tokens=16))
    request = list(out)[0]
    raw = cache["{}[{}]".format(
        "LlamaAttention.forward" if implementation == "sdpa" else "eager_paged_attention_forward",
        request)]
    assert raw[0].shape[2] < len(prompt)  # the prefill was chunked
    tokens, reference = _alone(eager, prompt)
    assert list(out[request].generated_tokens) == tokens
    steps = steps_by_module(model, cache, request=request)
    for layer in range(2):
        mine = steps["model.layers.{}.self_attn".format(layer)]
        assert mine[0].shape == (1, 4, len(prompt), len(prompt))
        np.testing.assert_allclose(stitch(mine), stitch(reference[layer]), atol=ATOL, rtol=0)
