"""Where captures come from in code we do not own: one module per library.

* ``kernel``: the seam every library shares, torch's
  ``scaled_dot_product_attention``; captures each call's probabilities.
* ``transformers``: how its sdpa integration reshapes the kernel's input,
  and its eager-only models.
* ``timm``: timm's attention classes that never reach the kernel.
* ``torch``: ``nn.MultiheadAttention``'s fast path and its own weights.

Nothing here imports a library: each module acts when the library is
imported by the user's code (``visualizer._imports``).  The next library is
one new module, and an entry in ``visualizer.presets.FAMILIES`` if it needs a
preset.
"""
from .. import _imports

_adapters_waiting = False


def wait_for_adapters():
    """Register each library's kernel adapters when (if) the library is imported."""
    global _adapters_waiting
    if _adapters_waiting:
        return
    _adapters_waiting = True
    from . import transformers

    _imports.when_imported(transformers.SDPA_MODULE, transformers.on_sdpa_module)
