"""timm: its attention classes' eager paths.

Almost every timm attention calls ``F.scaled_dot_product_attention`` on its
fused path, and the kernel seam captures it there, the model's output
untouched.  Many take their eager path by default (Swin's fused path is
"experimental"; Swin v2's cosine attention, CaiT's talking heads, ConViT,
DaViT, EfficientFormer, Halo and Bottleneck attention, GC ViT, ... have none)
or when the user turns fusion off (``TIMM_FUSED_ATTN=0``,
``timm.layers.set_fused_attn(False)``).  For every timm module as it is
imported, the preset watches, in each of its classes (ConViT's is ``GPSA``:
names do not say attention in timm), every softmax result its methods
store, as it is stored (``attn`` mostly; every head of EfficientViT's loop
over heads; CaiT's and EfficientFormerV2's before the talking heads mix them;
see ``visualizer.integrations.watch_softmax_outputs``).  On the fused path
nothing is stored, and the kernel calls made inside the same method supply
the maps, under the method's qualname, whichever path ran.
"""
from ._common import Preset, watch_softmax_outputs

__all__ = ["BATCH_NAMES", "PACKAGE", "PRESET", "watch_module"]

PACKAGE = "timm"
# The locals its attention classes keep the batch size in (``B, N, C = x.shape``).
BATCH_NAMES = ("B",)


def watch_module(get_local, module):
    """Watch the eager attention of one timm module; return the functions watched."""
    return watch_softmax_outputs(get_local, module, named=False, batch_names=BATCH_NAMES)


PRESET = Preset(
    "timm", "timm.*: the softmax output of each attention class", waits_for=PACKAGE,
    submodules=True, apply=lambda get_local, module: (watch_module(get_local, module), ()),
    still="its fused path is still captured at the kernel.")
