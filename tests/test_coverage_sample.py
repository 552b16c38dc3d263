"""A fixed sample of the coverage sweep (``python -m benchmarks.coverage``), run on every submission.

About forty architectures chosen to span the attention styles: encoders,
decoders with GQA and sliding windows, encoder-decoders with cross
attention, vision and speech towers, an eager-only model (XLNet), and timm's
own attention classes (class attention, talking heads, cross-covariance,
windowed, spatial-reduction, pooling, multi-scale, mask-unit, gated
positional, per-head loops, differential attention), ConvBERT's attention
beside a convolution softmax and SEW-D's ``XSoftmax``, and models that merge
their heads into the batch axis (FSMT, ViTDet, BoTNet, SAM ViT: captured in
the reference's own layout).  Each is
checked exactly as in the full sweep, in a forked child with a memory cap and
a time limit: every map of an independent reference (``output_attentions``
under eager; softmax outputs and recomputed SDPA probabilities with timm's
fused path off) must equal a captured map, and the outputs under capture must
be bit-identical to the outputs without.  Known misses are ``xfail`` with
their reason (strict: a fix makes them fail until they are moved back).
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, require

TRANSFORMERS = ["bert", "roberta", "gpt2", "llama", "mistral", "gemma2", "qwen2", "t5", "bart",
                "clip", "vit", "whisper", "xlnet", "deberta-v2", "opt", "convbert", "sew-d", "fsmt",
                "vitdet"]
TIMM = ["vit_small_patch16_224", "deit_tiny_patch16_224", "beit_base_patch16_224",
        "eva02_tiny_patch14_224", "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224",
        "cait_xxs24_224", "xcit_nano_12_p16_224", "levit_128s", "pvt_v2_b0", "twins_svt_small",
        "maxvit_nano_rw_256", "mvitv2_tiny", "hiera_tiny_224", "efficientformer_l1",
        "crossvit_tiny_240", "efficientvit_m0", "convit_tiny", "efficientformerv2_s0",
        "vit_dwee_patch16_reg1_gap_256", "botnet26t_256", "samvit_base_patch16"]
# Architectures whose attention is not softmax attention: the sweep must say so.
NO_ATTENTION = {("timm", "coat_lite_tiny"): "factorized (linear) attention: softmax over keys only"}

# (library, name) -> why it is not covered yet (none in this sample today).
KNOWN_MISSES = {}


_SWEPT = {}


def _check(library, name):
    """The sweep's result for one architecture; each library's sample is swept once, by the sweep
    command itself in a fresh interpreter (a forked child per architecture with a memory cap and a
    time limit), so nothing of this test process leaks in."""
    require("torch")
    require(library)
    if library not in _SWEPT:
        names = [n for lib, n in _all() if lib == library]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.json")
            command = [sys.executable, "-m", "benchmarks.coverage", "--library", library,
                       "--only", ",".join(names), "--memory-gb", "8", "--timeout", "300",
                       "--out", os.path.join(tmp, "COVERAGE.md"), "--json", out]
            done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  universal_newlines=True, timeout=1800)
            assert done.returncode == 0, done.stdout[-3000:]
            with open(out) as f:
                section = json.load(f)[0]
        _SWEPT[library] = {r["name"]: r for r in section["results"]}
    return _SWEPT[library][name]


def _all():
    return ([("transformers", n) for n in TRANSFORMERS] + [("timm", n) for n in TIMM]
            + sorted(NO_ATTENTION))


def _cases():
    for library, names in (("transformers", TRANSFORMERS), ("timm", TIMM)):
        for name in names:
            reason = KNOWN_MISSES.get((library, name))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            yield pytest.param(library, name, id="{}-{}".format(library, name), marks=marks)


@pytest.mark.parametrize("library, name", list(_cases()))
def test_captured_maps_equal_the_reference_and_outputs_are_unchanged(library, name):
    result = _check(library, name)
    assert result["status"] == "covered", "{} {}: {} ({})".format(
        library, name, result["status"], result.get("reason"))
    assert result["maps"] > 0 and result["unmatched"] == 0


@pytest.mark.parametrize("library, name", sorted(NO_ATTENTION))
def test_attention_without_a_probability_matrix_is_reported_as_such(library, name):
    result = _check(library, name)
    assert result["status"] == "no attention", result


def test_the_implementations_table_for_llama_is_measured_not_written():
    """A sample of ``benchmarks.coverage.implementations``: Llama in every implementation."""
    require("torch")
    transformers = require("transformers")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "COVERAGE.md")
        with open(out, "w") as f:
            f.write("# Coverage\n\nkept\n")
        done = subprocess.run([sys.executable, "-m", "benchmarks.coverage.implementations",
                               "--only", "llama", "--out", out], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=1800)
        assert done.returncode == 0, done.stdout[-3000:]
        with open(out) as f:
            text = f.read()
    assert text.startswith("# Coverage\n\nkept\n")  # the architecture sweep's part is kept
    row = [line for line in text.splitlines() if line.startswith("| llama |")]
    cells = [c.strip() for c in row[0].strip("|").split("|")][1:]
    paged = hasattr(transformers.GenerationMixin, "generate_batch")
    # eager, sdpa, flex, compiled sdpa, compiled flex, paged: all covered; flash not measured
    assert cells == ["✓"] * 5 + ["✓" if paged else "–", "·"], done.stdout[-3000:]
