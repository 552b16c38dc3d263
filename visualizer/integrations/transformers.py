"""transformers: what the kernel seam needs to know, and its eager-only models.

transformers 5.x computes attention with the function that
``config._attn_implementation`` names: ``'sdpa'`` by default, which calls the
kernel (``integrations/sdpa_attention.py``), or the ``eager_attention_forward``
of each modeling module.  So:

* default (sdpa) models are captured at the kernel seam, under the
  ``__qualname__`` of their attention class (``'BertSelfAttention.forward'``),
  outputs untouched.  For a one-token decoding step with a mask,
  ``sdpa_attention_forward`` packs grouped-query heads into the query axis
  (``pack_gqa``: the kernel sees ``(batch, kv_heads, n_rep, dim)``);
  ``_sdpa_adapter`` unpacks them, so captures are ``(batch, heads, 1, keys)``.
* models that run eager (those without an sdpa path, or built with
  ``attn_implementation='eager'``) are captured from their module's
  ``eager_attention_forward`` (variable ``attn_weights``, source: the
  attention module), for every modeling module, as it is imported.
* ``get_local.watch('...modeling_bert.eager_attention_forward', 'attn_weights')``
  on a default (sdpa) model: that function never runs, so the seam hands it
  the kernel's probabilities, from the calls whose attention module's class
  is defined in that modeling module.
* attention classes that compute attention in their own methods (all of
  transformers 4.x; in 5.x BLOOM, XLNet, GIT's text attention, ...): each
  attention class's methods are watched for every softmax
  result they store (``attention_probs``, ``attn_prob``; ConvBERT's
  attention beside its span-based convolution kernel's softmax; DeBERTa's
  and SEW-D's ``XSoftmax``), under the method's qualname; 4.x SDPA classes
  call the kernel themselves.  Those that merge the heads into the batch axis
  (FSMT, MVP, XGLM, Table Transformer, ViTDet, Mask2Former's decoder; every
  BART-era class of 4.x) store ``(batch x heads, queries, keys)`` and return
  it split for ``output_attentions``: their maps are split the same way, by
  the module's ``num_heads`` and the batch size in ``bsz`` or ``batch_size``
  (``BATCH_NAMES``; see ``integrations.heads_apart``).
"""
import sys

from .. import _imports
from . import kernel
from ._common import Preset, watch_softmax_outputs

__all__ = ["BATCH_NAMES", "PACKAGE", "PRESET", "SDPA_MODULE", "adapt_sdpa", "is_modeling_module",
           "on_sdpa_module", "wait_for_adapters", "watch_modeling_module"]

PACKAGE = "transformers"
SDPA_MODULE = PACKAGE + ".integrations.sdpa_attention"
# The locals its attention classes keep the batch size in (``bsz * self.num_heads``).
BATCH_NAMES = ("bsz", "batch_size")


def adapt_sdpa(frame, call, state):
    """Give a kernel call made by ``sdpa_attention_forward`` its model-level shape and owner."""
    local = frame.f_locals
    q = call.query
    q_length = local.get("q_length")
    if q_length == 1 and q.dim() == 4 and q.shape[2] > 1:
        # pack_gqa: head h = g * n_rep + r sits at [g, r]; put the heads back.
        batch, groups, n_rep, dim = q.shape
        mask = call.attn_mask
        if mask is not None and mask.dim() == 4 and mask.shape[1] == groups and \
                mask.shape[2] == n_rep:
            mask = mask.reshape(mask.shape[0], groups * n_rep, 1, mask.shape[-1])
        call = call.replace(query=q.reshape(batch, groups * n_rep, 1, dim), attn_mask=mask,
                            enable_gqa=True)
    module = local.get("module")
    modeling = sys.modules.get(type(module).__module__) if module is not None else None
    eager = getattr(modeling, "eager_attention_forward", None)
    code = getattr(eager, "__code__", None)
    if code is not None:
        target = state.target_of(code)
        if target is not None and target.explicit and target.names == ("attn_weights",):
            return call, (target, module)
    return call, None


def watch_modeling_module(get_local, module):
    """Watch one modeling module's eager attention; return the functions watched."""
    watched = []
    eager = getattr(module, "eager_attention_forward", None)
    if getattr(eager, "__code__", None) is not None and \
            "attn_weights" in eager.__code__.co_varnames:
        watched.append(get_local._watch(eager, ("attn_weights",), source="module",
                                        explicit=False, attention=True))
    # Attention classes that compute their own softmax: every class of modules
    # without a module-level eager function (transformers 4.x, and 5.x models
    # such as BLOOM and XLNet), and those beside it (GIT's text attention, the
    # BigBird-Pegasus encoder's full attention).  Classes that dispatch to
    # eager_attention_forward store no softmax and are left alone.
    return watched + watch_softmax_outputs(get_local, module, batch_names=BATCH_NAMES)


_adapters_waiting = []


def wait_for_adapters():
    """Register the kernel adapters when (if) transformers' sdpa module is imported, once."""
    if not _adapters_waiting:
        _adapters_waiting.append(True)
        _imports.when_imported(SDPA_MODULE, on_sdpa_module)


def on_sdpa_module(module):
    """Register the adapter for ``sdpa_attention_forward`` (when its module is imported)."""
    function = getattr(module, "sdpa_attention_forward", None)
    if getattr(function, "__code__", None) is not None:
        kernel.adapter(function.__code__, adapt_sdpa)


def is_modeling_module(name):
    """Whether ``name`` is a transformers modeling module (``transformers.models.x.modeling_x``)."""
    parts = name.split(".")
    return len(parts) == 4 and parts[:2] == [PACKAGE, "models"] and \
        parts[3].startswith("modeling_") and \
        not parts[3].startswith(("modeling_tf_", "modeling_flax_"))


def _apply(get_local, module):
    if not is_modeling_module(module.__name__):
        return (), ()
    return watch_modeling_module(get_local, module), ()


PRESET = Preset(
    "transformers", "transformers.models.*.modeling_*.eager_attention_forward",
    waits_for=PACKAGE + ".models", submodules=True, apply=_apply,
    still="its sdpa path is still captured at the kernel. To capture its eager path, watch "
          "the function that computes it with get_local.watch('module.function', 'variable').")
