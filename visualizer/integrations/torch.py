"""torch: ``nn.MultiheadAttention``.

Its Python path calls the kernel when the caller asks for no weights
(``need_weights=False``, as ``nn.TransformerEncoderLayer`` does): the seam
captures it there, unchanged.  Two things need a preset while capturing:

* the fast path (``torch.backends.mha``), a native kernel for inference that
  runs no Python at all, is switched off, and back on afterwards;
* with ``need_weights=True`` (``MultiheadAttention``'s default) torch computes
  the weights itself and averages them over heads; ``multihead_forward``
  asks for them per head instead and averages them as torch would, so the
  caller gets bit for bit what it asked for and the capture has every head.
"""
import inspect

from ._common import Preset

__all__ = ["PRESET", "multihead_forward", "watch_multihead"]


def multihead_forward(original):
    """Build the ``MultiheadAttention.forward`` that the preset installs while capturing.

    Calls that want weights keep them per head in ``attn_output_weights``
    (which the preset captures); the others run the original, which reaches
    the kernel seam.
    """
    signature = inspect.signature(original)

    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        if not call["need_weights"] or (call.get("is_causal") and call.get("attn_mask") is None):
            # no weights asked for (or none computed: is_causal without a mask)
            return original(self, *args, **kwargs)
        average = call.get("average_attn_weights", True)
        call["average_attn_weights"] = False
        attn_output, attn_output_weights = original(**call)
        if average and attn_output_weights is not None:
            return attn_output, attn_output_weights.mean(dim=1)
        return attn_output, attn_output_weights

    forward.__qualname__ = original.__qualname__
    forward.__name__ = original.__name__
    forward.__doc__ = original.__doc__
    forward.__module__ = original.__module__
    forward.__wrapped__ = original
    return forward


def watch_multihead(get_local, torch):
    """Watch ``nn.MultiheadAttention``: its weights per head while capturing, its fast path off.

    Returns ``(functions, switches)`` for ``visualizer.presets``: the forward
    installed while capturing, and the switch that installs it and turns the
    fast path off when capture starts, and puts both back when it stops.
    """
    mha = torch.nn.MultiheadAttention
    original = vars(mha)["forward"]
    replacement = multihead_forward(original)
    get_local._state.register(replacement, ("attn_output_weights",), "self",
                              explicit=False, attention=True)
    saved = {}

    def on():
        saved["forward"] = vars(mha)["forward"]
        saved["fastpath"] = torch.backends.mha.get_fastpath_enabled()
        mha.forward = replacement
        torch.backends.mha.set_fastpath_enabled(False)

    def off():
        if vars(mha).get("forward") is replacement:
            mha.forward = saved.get("forward", original)
        torch.backends.mha.set_fastpath_enabled(saved.get("fastpath", True))

    return [replacement], [(on, off)]


# Waits for ``torch`` itself: its submodules are imported while torch's
# __init__ runs, when torch.backends does not exist yet.
PRESET = Preset("torch", "torch.nn.MultiheadAttention.forward", waits_for="torch",
                apply=watch_multihead)
