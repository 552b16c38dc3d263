"""An independent record of every attention probability a PyTorch forward computes.

:class:`SoftmaxRecorder` is a ``TorchFunctionMode``: while it is on, every
softmax over the last dimension of a tensor of three or more dimensions is
recorded (``torch.softmax``, ``Tensor.softmax``, ``F.softmax``, ``nn.Softmax``),
and every ``F.scaled_dot_product_attention`` call has its probabilities
recomputed by hand (``softmax(q kᵀ · scale + mask)``, causal and GQA
included) and recorded beside the real call, whose result is returned
untouched.  Beside each map it keeps the method that computed it and what
that method knows of its layout: its module's ``num_heads`` and the batch
size in its local ``B`` (timm's spellings; see ``_timm.in_layout``).  It
knows nothing of visualizer: it is the reference the captures are compared
with (run it on a model whose fused attention is switched off, so that the
probabilities exist).
"""
import math
import sys

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SoftmaxRecorder", "sdpa_probabilities"]

_SOFTMAX = {torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax, torch.special.softmax}


def sdpa_probabilities(query, key, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False, **ignored):
    """``softmax(q kᵀ · scale + mask)`` as ``scaled_dot_product_attention`` defines it (no dropout)."""
    q = query.float()
    k = key.float()
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale
    length, source = scores.shape[-2], scores.shape[-1]
    if is_causal:
        keep = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    return scores.softmax(dim=-1)


class SoftmaxRecorder(TorchFunctionMode):
    """Record softmax outputs and recomputed SDPA probabilities into ``self.maps`` (detached copies)."""

    def __init__(self):
        super().__init__()
        self.maps = []
        self.kinds = []
        self.owners = []
        self.layouts = []  # (num_heads, B) of the computing method, each None where it has none

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _SOFTMAX:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(result, torch.Tensor) and result.dim() >= 3 and dim is not None and (
                    dim == -1 or dim == result.dim() - 1):
                self.maps.append(result.detach().float().clone())
                self.kinds.append("softmax")
                self._owner()
        elif func is torch.nn.functional.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            bound = dict(zip(names, args), **kwargs)
            bound.pop("value", None)
            with torch.no_grad():
                self.maps.append(sdpa_probabilities(**bound).detach())
            self.kinds.append("sdpa")
            self._owner()
        return result

    def _owner(self):
        """Record the nearest method of a ``torch.nn.Module`` on the call stack: its
        ``'Class.method'`` and ``(num_heads, B)``."""
        frame = sys._getframe(2)
        while frame is not None:
            local = frame.f_locals
            module = local.get("self") if frame.f_code.co_varnames[:1] == ("self",) else None
            if isinstance(module, torch.nn.Module):
                self.owners.append("{}.{}".format(type(module).__name__, frame.f_code.co_name))
                self.layouts.append((_int(getattr(module, "num_heads", None)), _int(local.get("B"))))
                return
            frame = frame.f_back
        self.owners.append("?")
        self.layouts.append((None, None))


def _int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None
