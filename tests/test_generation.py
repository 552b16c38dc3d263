"""visualizer.generation: per-step maps of generate() stitched into one matrix.

The reference is never our own code: the stitched matrix of each family is
compared with transformers' own eager attention of ONE forward pass over the
final sequence without its last token (``attn_implementation='eager'``,
``output_attentions=True``).  The per-step maps come from transformers'
``generate(output_attentions=True)`` under eager (an independent path).
Models are tiny and random (2 layers, width 32), built from configs, offline.
"""
import inspect
import os

import numpy as np
import pytest

from conftest import require
from visualizer import VisualizerError
from visualizer.generation import split_layers, split_runs, steps_by_module, stitch

VOCAB = 99
PAD = 0
ATOL = 1e-5


# ---------------------------------------------------------------------------
# Tiny random models, one per family
# ---------------------------------------------------------------------------

def _common():
    return dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=None, bos_token_id=1)


def _decoder_configs(t):
    c = _common()
    llama = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return {
        "gpt2": lambda: t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **c),
        "llama": lambda: t.LlamaConfig(**llama, **c),
        # a window shorter than the prompt, so the cache slides
        "mistral": lambda: t.MistralConfig(sliding_window=4, **llama, **c),
        "qwen2": lambda: t.Qwen2Config(**llama, **c),
        # local (sliding) and global layers, logits soft-capped in attention
        "gemma2": lambda: t.Gemma2Config(head_dim=8, sliding_window=4,
                                         attn_logit_softcapping=5.0,
                                         final_logit_softcapping=30.0, **llama, **c),
        "phi3": lambda: t.Phi3Config(**llama, **c),
        "falcon": lambda: t.FalconConfig(hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, **c),
        "gpt_neox": lambda: t.GPTNeoXConfig(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            max_position_embeddings=128, **c),
        "opt": lambda: t.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=32,
                                   max_position_embeddings=128, **c),
        "bloom": lambda: t.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **c),
    }


DECODERS = ["gpt2", "llama", "mistral", "qwen2", "gemma2", "phi3", "falcon", "gpt_neox",
            "opt", "bloom"]
SEQ2SEQ = ["t5", "bart", "whisper"]


def _build(family, eager=True):
    torch = require("torch")
    t = require("transformers")
    torch.manual_seed(0)
    impl = {"attn_implementation": "eager"} if eager else {}
    if family in DECODERS:
        config = _decoder_configs(t)[family]()
        model = t.AutoModelForCausalLM.from_config(config, **impl)
    elif family == "t5":
        config = t.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            decoder_start_token_id=PAD, **_common())
        model = t.T5ForConditionalGeneration(config) if not impl else \
            t.T5ForConditionalGeneration._from_config(config, **impl)
    elif family == "bart":
        config = t.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=4, decoder_attention_heads=4,
                              encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=2,
                              forced_bos_token_id=None, forced_eos_token_id=None,
                              max_position_embeddings=128, **_common())
        model = t.BartForConditionalGeneration._from_config(config, **impl)
    elif family == "whisper":
        config = t.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2,
                                 encoder_attention_heads=4, decoder_attention_heads=4,
                                 encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                                 max_source_positions=8, max_target_positions=64,
                                 decoder_start_token_id=2, suppress_tokens=None,
                                 begin_suppress_tokens=None, **_common())
        model = t.WhisperForConditionalGeneration._from_config(config, **impl)
    else:
        raise AssertionError(family)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    for name in ("forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                 "begin_suppress_tokens"):
        if hasattr(model.generation_config, name):
            setattr(model.generation_config, name, None)
    return model


def _prompt(batch=2, length=6, seed=1):
    torch = require("torch")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _encoder_inputs(family, batch=2):
    torch = require("torch")
    if family == "whisper":
        g = torch.Generator().manual_seed(2)
        return {"input_features": torch.randn(batch, 8, 16, generator=g)}
    return {"input_ids": _prompt(batch, 7, seed=3)}


def _position_ids(model, mask):
    """The positions generate() gives a left-padded batch, for the models that take them."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return {}
    positions = mask.long().cumsum(-1) - 1
    return {"position_ids": positions.masked_fill(mask == 0, 1)}


def _decoder_steps(model, ids, mask=None, **generate):
    """Per-layer step maps from generate(output_attentions=True) under eager, and the sequences."""
    torch = require("torch")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5,
                             output_attentions=True, return_dict_in_generate=True, **generate)
    layers = len(out.attentions[0])
    steps = [[step[layer] for step in out.attentions] for layer in range(layers)]
    return out, steps


def _decoder_reference(model, sequences, mask=None):
    """Eager attention of one forward pass over the final sequences without their last token."""
    torch = require("torch")
    inputs = sequences[:, :-1]
    kwargs = {}
    if mask is not None:
        full = torch.cat([mask, torch.ones_like(inputs[:, mask.shape[1]:])], dim=1)
        kwargs = dict(attention_mask=full, **_position_ids(model, full))
    with torch.no_grad():
        out = model(inputs, output_attentions=True, use_cache=False, **kwargs)
    return [a.numpy() for a in out.attentions]


# ---------------------------------------------------------------------------
# Every family, greedy and sampled: stitched == one eager forward
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("family", DECODERS)
def test_decoder_stitch_equals_one_forward(family, sample):
    torch = require("torch")
    model = _build(family)
    torch.manual_seed(7)
    out, steps = _decoder_steps(model, _prompt(), do_sample=sample)
    reference = _decoder_reference(model, out.sequences)
    assert len(steps) == len(reference) == 2
    T = out.sequences.shape[1] - 1
    for layer, (layer_steps, ref) in enumerate(zip(steps, reference)):
        stitched = stitch(layer_steps)
        assert stitched.shape == ref.shape == (2, ref.shape[1], T, T)
        np.testing.assert_allclose(stitched, ref, atol=ATOL, err_msg="layer {}".format(layer))
        assert np.all(np.triu(stitched, 1) == 0)


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_row_only_steps_give_the_last_rows(family):
    """Steps cut to their last row (what queries=-1 keeps) stitch into the rows they hold."""
    model = _build(family)
    out, steps = _decoder_steps(model, _prompt())
    for layer_steps in steps:
        full = stitch(layer_steps)
        rows = stitch([s[:, :, -1:, :] for s in layer_steps])
        P = layer_steps[0].shape[2]
        assert rows.shape == full[..., P - 1:, :].shape
        np.testing.assert_allclose(rows, full[..., P - 1:, :], atol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "gemma2", "opt", "bloom",
                                    "falcon", "qwen2", "phi3", "gpt_neox"])
def test_left_padded_batch(family):
    torch = require("torch")
    model = _build(family)
    ids = _prompt(3, 7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    out, steps = _decoder_steps(model, ids, mask)
    reference = _decoder_reference(model, out.sequences, mask)
    for layer_steps, ref in zip(steps, reference):
        stitched = stitch(layer_steps, attention_mask=mask)
        for b, pad in enumerate([3, 0, 1]):
            np.testing.assert_allclose(stitched[b, :, pad:, pad:], ref[b, :, pad:, pad:],
                                       atol=ATOL)
            # padded positions: rows and columns are zero
            assert not stitched[b, :, :pad, :].any() and not stitched[b, :, :, :pad].any()
        rows = stitch([s[:, :, -1:, :] for s in layer_steps], attention_mask=mask)
        np.testing.assert_allclose(rows, stitched[..., 6:, :], atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "mistral"])
def test_static_cache(family):
    model = _build(family)
    out, steps = _decoder_steps(model, _prompt(), cache_implementation="static")
    if family != "mistral":  # a full-attention layer's kernel sees the whole static cache
        assert steps[-1][0].shape[-1] == steps[-1][1].shape[-1] == steps[-1][-1].shape[-1]
    reference = _decoder_reference(model, out.sequences)
    for layer_steps, ref in zip(steps, reference):
        np.testing.assert_allclose(stitch(layer_steps), ref, atol=ATOL)
        np.testing.assert_allclose(stitch([s[:, :, -1:, :] for s in layer_steps]),
                                   ref[..., 5:, :], atol=ATOL)


def test_sliding_window_cache_slides():
    """Mistral's cache keeps the last `window` keys: the steps' key count stops growing."""
    model = _build("mistral")
    out, steps = _decoder_steps(model, _prompt())
    assert {s.shape[-1] for s in steps[0][1:]} == {4}
    reference = _decoder_reference(model, out.sequences)
    stitched = stitch(steps[0])
    np.testing.assert_allclose(stitched, reference[0], atol=ATOL)
    assert not np.tril(stitched[0, 0], -4).any()  # nothing outside the window


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_with_beam_indices(family):
    """Each returned sequence gets the rows of the slot its prefix held at each step."""
    torch = require("torch")
    model = _build(family)
    with torch.no_grad():
        out = model.generate(_prompt(), max_new_tokens=5, num_beams=3, num_return_sequences=2,
                             output_attentions=True, output_scores=True,
                             return_dict_in_generate=True)
    assert out.attentions[0][0].shape[0] == 6  # batch x beams
    reference = _decoder_reference(model, out.sequences)
    for layer in range(2):
        steps = [step[layer] for step in out.attentions]
        stitched = stitch(steps, beam_indices=out.beam_indices)
        assert stitched.shape[0] == 4
        np.testing.assert_allclose(stitched, reference[layer], atol=ATOL)
        rows = stitch([s[:, :, -1:, :] for s in steps], beam_indices=out.beam_indices)
        np.testing.assert_allclose(rows, reference[layer][..., 5:, :], atol=ATOL)
    # without beam_indices, slots mix hypotheses: the result is not that of the sequences
    plain = stitch([step[0] for step in out.attentions])
    reordered = out.beam_indices[:, 1:].ne(out.beam_indices[:, :1]).any()
    if reordered:
        assert not all(np.allclose(plain[out.beam_indices[r, 0].item()], reference[0][r],
                                   atol=ATOL) for r in range(4))


# ---------------------------------------------------------------------------
# Encoder-decoders: the decoder's self-attention and cross-attention
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_encoder_decoder(family, sample):
    torch = require("torch")
    model = _build(family)
    inputs = _encoder_inputs(family)
    torch.manual_seed(7)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=sample,
                             output_attentions=True, return_dict_in_generate=True)
        ref = model(**inputs, decoder_input_ids=out.sequences[:, :-1], output_attentions=True,
                    use_cache=False)
    T = out.sequences.shape[1] - 1
    for layer in range(2):
        self_steps = [step[layer] for step in out.decoder_attentions]
        cross_steps = [step[layer] for step in out.cross_attentions]
        stitched = stitch(self_steps)
        assert stitched.shape[-2:] == (T, T)
        np.testing.assert_allclose(stitched, ref.decoder_attentions[layer].numpy(), atol=ATOL)
        np.testing.assert_allclose(stitch(cross_steps, cross=True),
                                   ref.cross_attentions[layer].numpy(), atol=ATOL)


# ---------------------------------------------------------------------------
# Bad input: clear errors, never a wrong matrix in silence
# ---------------------------------------------------------------------------

def _toy(P=3, n=3, batch=1, heads=2, seed=0):
    """Causal softmax steps of a random score matrix, and its full matrix."""
    rng = np.random.default_rng(seed)
    T = P + n - 1
    scores = rng.normal(size=(batch, heads, T, T))
    scores[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = -np.inf
    full = np.exp(scores - scores.max(-1, keepdims=True))
    full /= full.sum(-1, keepdims=True)
    steps = [full[:, :, :P, :P]] + [full[:, :, p:p + 1, :p + 1] for p in range(P, T)]
    return steps, full


def test_toy_round_trip_and_torch_input():
    torch = require("torch")
    steps, full = _toy()
    np.testing.assert_allclose(stitch(steps), full, atol=1e-12)
    out = stitch([torch.from_numpy(s).to(torch.bfloat16) for s in steps])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, full, atol=1e-2)


def test_numpy_only_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from visualizer.generation import stitch\n"
            "stitch([np.eye(2)[None, None], np.full((1, 1, 1, 3), 1 / 3)])\n"
            "assert 'torch' not in sys.modules\n")
    from conftest import ROOT
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("bad, message", [
    ([], "no step maps"),
    ({"a": []}, "ONE attention module"),
    (np.zeros((1, 1, 2, 2)), "list of per-step maps"),
    ([np.zeros((2, 2, 2))], "must be 4-D"),
    ([np.eye(2)[None, None], np.zeros((1, 2, 1, 3))], "batch 1 and 2 heads"),
    ([np.eye(2)[None, None], np.full((1, 1, 2, 3), 0.3)], "2 query rows"),
    ([np.eye(2)[None, None], np.full((1, 1, 1, 4), 0.25)], "after its own position"),
    ([np.array([[[[2.0, 0.0], [3.0, 4.0]]]])], "not attention probabilities"),
    ([np.array([[[[1.0, 0.0], [-0.5, 1.5]]]])], "not attention probabilities"),
])
def test_bad_steps(bad, message):
    with pytest.raises(VisualizerError, match=message):
        stitch(bad)


def test_missing_step_is_an_error():
    steps, _ = _toy(P=3, n=4)
    with pytest.raises(VisualizerError, match="after its own position"):
        stitch(steps[:2] + steps[3:])


def test_key_count_change_after_a_slide_is_an_error():
    steps, full = _toy(P=3, n=5)
    slid = [steps[0]] + [s[..., -3:] for s in steps[1:]]  # a window of 3 (rows renormalised
    slid = [s / s.sum(-1, keepdims=True) for s in slid]  # as a sliding mask would)
    assert stitch(slid).shape == full.shape
    with pytest.raises(VisualizerError, match="slid at 3 keys"):
        stitch(slid[:3] + [steps[2]] + slid[4:])


def test_mask_that_does_not_fit_is_an_error():
    steps, _ = _toy(P=3, n=2)
    with pytest.raises(VisualizerError, match="real token attends to it"):
        stitch(steps, attention_mask=np.array([[0, 1, 1]]))
    with pytest.raises(VisualizerError, match="expected \\(batch, length\\)"):
        stitch(steps, attention_mask=np.ones((2, 3)))
    with pytest.raises(VisualizerError, match="fewer than the prompt"):
        stitch(steps, attention_mask=np.ones((1, 2)))


def test_beam_indices_checked():
    steps, _ = _toy(P=3, n=2, batch=2)
    with pytest.raises(VisualizerError, match="holds slot 5"):
        stitch(steps, beam_indices=np.array([[5, 0]]))
    with pytest.raises(VisualizerError, match="1 columns for 2 steps"):
        stitch(steps, beam_indices=np.array([[0]]))


def test_cross_attention_shapes_are_named():
    """One row over K keys, then K keys again: cross-attention or a window == prompt."""
    cross = [np.full((1, 1, 1, 4), 0.25)] * 3
    with pytest.raises(VisualizerError, match="cross=True"):
        stitch(cross)
    assert stitch(cross, cross=True).shape == (1, 1, 3, 4)
    assert stitch(cross, prompt_length=4).shape == (1, 1, 3, 6)


# ---------------------------------------------------------------------------
# Splitting flat capture lists
# ---------------------------------------------------------------------------

def test_split_runs_and_layers():
    a, _ = _toy(P=3, n=3)
    b, _ = _toy(P=4, n=2)
    runs = split_runs(a + b)
    assert [len(r) for r in runs] == [3, 2]
    # T5-like: a one-token prompt each time; the key count drops to 1 at the next call
    one, _ = _toy(P=1, n=3)
    assert [len(r) for r in split_runs(one + one)] == [3, 3]
    flat = [m for pair in zip(a, a) for m in pair]  # two layers, interleaved step by step
    layers = split_layers(flat)
    assert len(layers) == 2 and all(len(layer) == 3 for layer in layers)
    with pytest.raises(VisualizerError):
        split_layers([np.zeros((1, 1, 1, 3))] * 4)


def test_split_runs_static_cache_after_a_cropped_prefill():
    """Prompt step over the prompt's keys, then every step over the whole static cache."""
    steps, full = _toy(P=3, n=3)
    static = [steps[0]] + [np.pad(s, [(0, 0)] * 3 + [(0, 8 - s.shape[3])]) for s in steps[1:]]
    assert [len(r) for r in split_runs(static + static)] == [3, 3]
    np.testing.assert_allclose(stitch(split_runs(static)[0]), full, atol=1e-12)
    # a jump to a row that weighs its own (last) key is a new call, not a static cache
    a, _ = _toy(P=3, n=2)
    b, _ = _toy(P=6, n=2)
    rows = [s[:, :, -1:] for s in a + b]
    assert [len(r) for r in split_runs(rows)] == [2, 2]


def test_steps_by_module_takes_the_by_module_dict():
    a, full = _toy(P=3, n=3)
    b, _ = _toy(P=4, n=2)
    steps = steps_by_module({"layers.0.attn": a})
    np.testing.assert_allclose(stitch(steps["layers.0.attn"]), full)
    with pytest.raises(VisualizerError, match="several generate"):
        steps_by_module({"layers.0.attn": a + b})
    assert len(steps_by_module({"layers.0.attn": a + b}, run=-1)["layers.0.attn"]) == 2
    with pytest.warns(UserWarning, match="left out 'proj'"):
        steps_by_module({"layers.0.attn": a, "proj": [np.zeros(3)]})
    with pytest.raises(VisualizerError, match="no attention maps"):
        steps_by_module({"proj": [np.zeros(3)]})


# ---------------------------------------------------------------------------
# Figures, and the command line: run saves the steps, plot draws the generation
# ---------------------------------------------------------------------------

def test_generation_figures():
    require("matplotlib")
    from visualizer.plotting import plot_generated_tokens, plot_generation

    model = _build("llama")
    out, steps = _decoder_steps(model, _prompt(1, 6))
    stitched = stitch(steps[0])
    tokens = ["t{}".format(int(i)) for i in out.sequences[0]]
    fig = plot_generation(stitched, tokens, prompt_length=6, head=1)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), stitched[0, 1], atol=1e-7)
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens[:-1]
    colours = [t.get_color() for t in ax.get_yticklabels()]
    assert colours[:6] != colours[6:] and len(set(colours[6:])) == 1
    # row-only rows (what queries=-1 keeps) draw as the last rows of the same picture
    rows = stitch([s[:, :, -1:, :] for s in steps[0]])
    fig = plot_generation(rows, tokens, prompt_length=6, head=1)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), stitched[0, 1, 5:], atol=1e-7)

    strips = plot_generated_tokens(rows, tokens, prompt_length=6, head=0)
    ax = strips.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["\u2192 " + t for t in tokens[6:]]
    # one cell per token of the text so far, the darkest where the weight is largest
    assert len(ax.patches) == sum(range(6, 11))
    first = ax.patches[:6]
    darkest = int(np.argmin([sum(p.get_facecolor()[:3]) for p in first]))
    assert darkest == int(np.argmax(stitched[0, 0, 5, :6]))
    with pytest.raises(VisualizerError, match="whole final sequence"):
        plot_generated_tokens(rows, tokens[:-1], prompt_length=6)
    with pytest.raises(VisualizerError, match="tokens for attention over"):
        plot_generation(stitched, tokens[:4], prompt_length=6)
    with pytest.raises(VisualizerError, match="prompt_length"):
        plot_generation(rows, tokens, prompt_length=3)


GENERATE_MODEL = '''
import torch, transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
    eos_token_id=None)
model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()
model.generation_config.eos_token_id = None
'''
GENERATE_SCRIPT = GENERATE_MODEL + '''
ids = torch.randint(3, 99, (1, 6))
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=5)
import numpy as np
np.save("sequences.npy", out.numpy())
'''


def test_cli_run_saves_steps_and_plot_draws_the_generation(tmp_path):
    require("transformers")
    require("matplotlib")
    from test_cli import cli

    from visualizer import get_local

    (tmp_path / "gen.py").write_text(GENERATE_SCRIPT)
    target = "transformers.models.llama.modeling_llama.eager_attention_forward=attn_weights"
    proc = cli("run", "--no-presets", "--watch", target, "--out", "gen.npz", "gen.py",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cache = get_local.load(str(tmp_path / "gen.npz"))
    values = cache["eager_attention_forward"]
    # two layers x (prompt step + 4 decoding steps), each of its own shape
    assert [v.shape[2:] for v in values[:4]] == [(6, 6), (6, 6), (1, 7), (1, 7)]
    assert len(values) == 10
    torch = require("torch")
    scope = {}
    exec(GENERATE_MODEL, scope)  # the same random model, built here for the reference
    sequences = torch.from_numpy(np.load(str(tmp_path / "sequences.npy")))
    with torch.no_grad():
        reference = [a.numpy() for a in scope["model"](sequences[:, :-1],
                                                       output_attentions=True).attentions]
    for layer, steps in enumerate(split_layers(values)):
        np.testing.assert_allclose(stitch(steps), reference[layer], atol=ATOL)

    proc = cli("plot", "gen.npz", "--out", "figures", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "generation of 5 steps over 2 layers" in proc.stderr
    assert sorted(os.listdir(str(tmp_path / "figures"))) == [
        "eager_attention_forward_generated_tokens_01.png",
        "eager_attention_forward_generation_00.png",
        "eager_attention_forward_generation_01.png"]


# ---------------------------------------------------------------------------
# Capture during generate() of the DEFAULT (SDPA) model, at the kernel seam
# ---------------------------------------------------------------------------

@pytest.fixture
def seam():
    """The global get_local with the attention presets on (undone afterwards)."""
    import visualizer

    get_local = visualizer.get_local
    get_local.watch_attention()
    yield get_local
    get_local.unwatch_attention()


def _attention_modules(model, steps):
    """The names in ``steps`` of the decoder's self-attention modules, in layer order."""
    order = [name for name, _ in model.named_modules() if name in steps]
    assert len(order) == 2, sorted(steps)
    return order


# Falcon's default (sdpa) FalconAttention.forward calls the kernel and then sets
# `attention_scores = None`: the preset's watched local is None there, and the kernel's
# probabilities take its place (a regression test for that case).
SEAM_FAMILIES = ["llama", "gpt2", "mistral", "qwen2", "gemma2", "phi3",
                 "falcon", "gpt_neox", "opt", "bloom"]


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("family", SEAM_FAMILIES)
def test_seam_capture_during_generate(family, sample, seam):
    torch = require("torch")
    get_local = seam
    model = _build(family, eager=False)
    eager = _build(family, eager=True)  # the same weights (same seed), for the reference
    ids = _prompt()
    torch.manual_seed(11)
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=5, do_sample=sample)
    torch.manual_seed(11)
    with get_local.capture() as cache, torch.no_grad():
        captured = model.generate(ids, max_new_tokens=5, do_sample=sample)
    torch.manual_seed(11)
    with get_local.capture(queries=-1) as rows_cache, torch.no_grad():
        rows_captured = model.generate(ids, max_new_tokens=5, do_sample=sample)
    assert torch.equal(plain, captured) and torch.equal(plain, rows_captured)
    reference = _decoder_reference(eager, plain)
    steps = steps_by_module(model, cache)
    rows = steps_by_module(model, rows_cache)
    for layer, name in enumerate(_attention_modules(model, steps)):
        assert len(steps[name]) == 5
        np.testing.assert_allclose(stitch(steps[name]), reference[layer], atol=ATOL)
        for full_step, row_step in zip(steps[name], rows[name]):
            assert row_step.shape[2] == 1
            np.testing.assert_allclose(row_step, full_step[:, :, -1:, :], atol=1e-6)
        np.testing.assert_allclose(stitch(rows[name]), reference[layer][..., 5:, :], atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt", "bloom"])
def test_seam_left_padded_and_static(family, seam):
    """Left padding, dynamic and static cache; compared on the real rows and keys only.

    The seam gives the rows of padded queries (every key masked) as zeros, as
    SDPA's math kernel does; transformers' eager path gives them a uniform
    row instead, so those rows are never compared with the reference.
    """
    torch = require("torch")
    get_local = seam
    model = _build(family, eager=False)
    eager = _build(family, eager=True)
    # Gemma 2 soft-caps its logits, which SDPA cannot: transformers runs it eager by
    # default, and it is captured from eager_attention_forward instead of the kernel.
    # BLOOM has no SDPA path and no eager_attention_forward: BloomAttention.forward's
    # attention_probs is captured.
    sdpa = model.config._attn_implementation == "sdpa"
    assert sdpa == (family not in ("gemma2", "bloom"))
    ids = _prompt(2, 7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    for options in ({}, {"cache_implementation": "static"}):
        with torch.no_grad():
            plain = model.generate(ids, attention_mask=mask, max_new_tokens=5, **options)
        with get_local.capture() as cache, torch.no_grad():
            captured = model.generate(ids, attention_mask=mask, max_new_tokens=5, **options)
        with get_local.capture(queries=-1) as rows_cache, torch.no_grad():
            rows_captured = model.generate(ids, attention_mask=mask, max_new_tokens=5, **options)
        assert torch.equal(plain, captured) and torch.equal(plain, rows_captured)
        reference = _decoder_reference(eager, plain, mask)
        steps = steps_by_module(model, cache)
        rows = steps_by_module(model, rows_cache)
        keys = {"llama": "LlamaAttention.forward", "opt": "OPTAttention.forward",
                "gemma2": "eager_attention_forward",  # from its modeling module
                "bloom": "BloomAttention.forward"}  # its own softmax output, attention_probs
        assert list(cache) == [keys[family]]
        for layer, name in enumerate(_attention_modules(model, steps)):
            where = "{} {}".format(name, options)
            padded = steps[name][0][0, :, :3]  # the rows of sample 0's padded queries
            if sdpa:  # the seam: zeros, as SDPA's math kernel gives
                assert not padded.any(), where
            else:  # transformers' eager path: a uniform row over the keys
                np.testing.assert_allclose(padded, 1 / padded.shape[-1], atol=1e-6)
            stitched = stitch(steps[name], attention_mask=mask)
            if sdpa:  # zero rows of padded queries stitch without the mask too
                np.testing.assert_allclose(stitch(steps[name])[1], stitched[1], atol=0)
            for b, pad in enumerate([3, 0]):
                np.testing.assert_allclose(stitched[b, :, pad:, pad:],
                                           reference[layer][b, :, pad:, pad:],
                                           atol=ATOL, err_msg=where)
            for full_step, row_step in zip(steps[name], rows[name]):
                np.testing.assert_allclose(row_step, full_step[:, :, -1:, :], atol=1e-6,
                                           err_msg=where)
            np.testing.assert_allclose(stitch(rows[name], attention_mask=mask),
                                       stitched[..., 6:, :], atol=1e-6, err_msg=where)


def test_seam_static_cache_unpadded(seam):
    """Static cache, no mask: transformers crops the keys to the prompt at prefill
    (``key[:, :, :q_length]`` when causal), then every step sees the whole cache."""
    torch = require("torch")
    get_local = seam
    model = _build("llama", eager=False)
    eager = _build("llama", eager=True)
    with torch.no_grad():
        plain = model.generate(_prompt(), max_new_tokens=5, cache_implementation="static")
    with get_local.capture() as cache, torch.no_grad():
        captured = model.generate(_prompt(), max_new_tokens=5, cache_implementation="static")
    with get_local.capture(queries=-1) as rows_cache, torch.no_grad():
        model.generate(_prompt(), max_new_tokens=5, cache_implementation="static")
    assert torch.equal(plain, captured)
    reference = _decoder_reference(eager, plain)
    steps = steps_by_module(model, cache)
    rows = steps_by_module(model, rows_cache)
    for layer, name in enumerate(_attention_modules(model, steps)):
        shapes = [s.shape[2:] for s in steps[name]]
        assert shapes[0] == (6, 6) and len({k for _, k in shapes[1:]}) == 1, shapes
        assert shapes[1][1] > 7  # the whole static cache, past position 6
        np.testing.assert_allclose(stitch(steps[name]), reference[layer], atol=ATOL)
        np.testing.assert_allclose(stitch(rows[name]), reference[layer][..., 5:, :], atol=ATOL)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_seam_encoder_decoder(family, sample, seam):
    """The decoder's self- and cross-attention, told apart by their module names."""
    torch = require("torch")
    get_local = seam
    model = _build(family, eager=False)
    eager = _build(family, eager=True)
    inputs = _encoder_inputs(family)

    def generate():
        # return_dict_in_generate: Whisper strips the decoder start token otherwise
        torch.manual_seed(7)
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=5, do_sample=sample,
                                  return_dict_in_generate=True).sequences

    plain = generate()
    with get_local.capture() as cache:
        captured = generate()
    with get_local.capture(queries=-1) as rows_cache:
        rows_captured = generate()
    assert torch.equal(plain, captured) and torch.equal(plain, rows_captured)
    with torch.no_grad():
        ref = eager(**inputs, decoder_input_ids=plain[:, :-1], output_attentions=True,
                    use_cache=False)
    steps = steps_by_module(model, cache)
    rows = steps_by_module(model, rows_cache)
    order = [name for name, _ in model.named_modules() if name in steps]
    cross = [n for n in order if "decoder" in n and n.rsplit(".", 1)[-1] in
             ("EncDecAttention", "encoder_attn")]
    self_attn = [n for n in order if "decoder" in n and n not in cross]
    encoder = [n for n in order if "encoder." in n and "decoder" not in n]
    assert len(cross) == len(self_attn) == len(encoder) == 2, order
    assert all(len(steps[n]) == 1 for n in encoder)  # the encoder runs once
    T = plain.shape[1] - 1
    for layer in range(2):
        stitched = stitch(steps[self_attn[layer]])
        assert stitched.shape[-2:] == (T, T)
        np.testing.assert_allclose(stitched, ref.decoder_attentions[layer].numpy(), atol=ATOL)
        np.testing.assert_allclose(stitch(steps[cross[layer]], cross=True),
                                   ref.cross_attentions[layer].numpy(), atol=ATOL)
        np.testing.assert_allclose(steps[encoder[layer]][0],
                                   ref.encoder_attentions[layer].numpy(), atol=ATOL)
        # decoding steps hold one row already: queries=-1 keeps them whole
        for name in (self_attn[layer], cross[layer]):
            for full_step, row_step in zip(steps[name], rows[name]):
                np.testing.assert_allclose(row_step, full_step, atol=1e-6)
