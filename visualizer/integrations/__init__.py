"""Where captures come from in code we do not own: one module per library.

This package plugs into the core (``visualizer._state.PLUGINS`` names it):
``plug_in(state)`` tells the state what computes attention (a softmax) and
adds the kernel seam and the compilers' support as extensions.  Each
library's module defines its ``watch_attention`` family as ``PRESET``;
``presets()`` gathers them.  What they share is in ``_common``.

* ``kernel``: the seam every library shares, torch's
  ``scaled_dot_product_attention``; captures each call's probabilities.
* ``flex``: torch's ``flex_attention`` (and transformers' compiled call of
  it), served by the kernel seam; captures each call's probabilities with
  its ``score_mod`` and block mask applied.
* ``transformers``: how its sdpa integration reshapes the kernel's input,
  and its eager-only models.
* ``timm``: timm's attention classes that never reach the kernel.
* ``torch``: ``nn.MultiheadAttention`` and the encoder layers that fuse it,
  whose fast paths make no kernel call: maps computed beside them.
* ``unreachable``: attention run where nothing can capture it (TorchScript, an
  exported program, a custom operator, xformers), counted while capturing
  and named when ``capture()`` ends.
* ``compile``: what torch's compilers (``torch.compile``, TorchScript) need
  from capture: rewritten code they can trace, and recompiling when it changes.

Nothing here imports a library: each module acts when the library is
imported by the user's code (``visualizer._imports``).  The next library is
one new module, with a ``PRESET`` listed in ``presets()`` if it needs one.
"""
from ._common import (HEAD_COUNTS, Preset, head_count, heads_apart, is_softmax,
                      softmax_outputs, split_heads, warn_unsplit, watch_softmax_outputs)

__all__ = ["HEAD_COUNTS", "Preset", "head_count", "heads_apart", "is_softmax", "plug_in",
           "presets", "softmax_outputs", "split_heads", "warn_unsplit", "watch_softmax_outputs"]


def plug_in(state):
    """Extend a capture state with what the libraries need (``visualizer._state.PLUGINS``)."""
    from . import compile, flex, kernel, transformers, unreachable

    state.attention_marks.append(is_softmax)
    state.extend(kernel.Seam())
    state.extend(compile.Compilers(state))
    state.extend(unreachable.Unreachable())
    transformers.wait_for_adapters()
    flex.install()


def presets():
    """Return ``{family: Preset}``, in the order ``watch_attention`` applies them.

    Each library's module defines its ``PRESET``; importing them imports no library.
    """
    from . import kernel, timm, torch, transformers

    return {module.PRESET.family: module.PRESET for module in (kernel, timm, transformers, torch)}
