"""timm: its attention classes' eager paths.

Almost every timm attention calls ``F.scaled_dot_product_attention`` on its
fused path, and the kernel seam captures it there, the model's output
untouched.  Some take their eager path by default (Swin's fused path is
"experimental", Swin v2's cosine attention has none) or when the user turns
fusion off (``TIMM_FUSED_ATTN=0``, ``timm.layers.set_fused_attn(False)``):
there the probabilities are the local ``attn``, which the preset watches.
On the fused path that variable is never bound, and the kernel call made
inside the same ``forward`` supplies it: one capture per call, under the
class's ``forward`` qualname, whichever path ran.
"""

__all__ = ["ATTENTION"]

# (module, qualname) of timm attention whose probabilities are the local
# ``attn`` on the eager path: the presets watch them (see visualizer.presets).
ATTENTION = (
    ("timm.layers.attention", "Attention.forward"),
    ("timm.layers.attention", "AttentionRope.forward"),
    ("timm.models.beit", "Attention.forward"),
    ("timm.models.eva", "EvaAttention.forward"),
    ("timm.models.swin_transformer", "WindowAttention.forward"),
    ("timm.models.swin_transformer_v2", "WindowAttention.forward"),
)
