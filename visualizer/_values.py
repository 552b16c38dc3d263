"""Turn a captured value into what the cache keeps.

Torch tensors become detached NumPy arrays on the CPU (float16 and bfloat16
as float32, since NumPy has no bfloat16); every other value is kept as it is.
Torch is never imported here: a type counts as a tensor only if ``torch`` is
already in ``sys.modules`` and the type subclasses ``torch.Tensor``.  The
answer is remembered per type, so the common case costs one dict lookup.
"""
import sys

_tensor_types = {}


def is_tensor(value):
    """Return True if ``value`` is a torch tensor (without importing torch)."""
    tp = type(value)
    known = _tensor_types.get(tp)
    if known is None:
        torch = sys.modules.get("torch")
        known = torch is not None and isinstance(tp, type) and issubclass(tp, torch.Tensor)
        _tensor_types[tp] = known
    return known


def tensor_to_numpy(tensor):
    """Return a detached CPU NumPy copy of ``tensor``; half precisions become float32."""
    import torch  # only reached with a tensor in hand, so torch is imported already

    t = tensor.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    # .numpy() shares memory with a CPU tensor that the model may later change
    # in place, so keep a copy that nothing else can write to.
    if t.device.type == "cpu":
        return t.numpy().copy()
    return t.cpu().numpy()


def to_numpy(value):
    """Return the value the cache keeps by default for ``value``."""
    if is_tensor(value):
        return tensor_to_numpy(value)
    return value
