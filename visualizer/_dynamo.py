"""Keep torch.compile from tracing rewritten code; it runs eagerly instead.

TorchDynamo cannot trace a code object whose constants hold our recorder
functions (it stops with "Cannot construct ConstantVariable").  Marked the way
``torch._dynamo.skip`` marks a function, a captured function runs uncompiled
inside a compiled model (a graph break at each call), so its values are the
real ones.  Nothing here imports torch: marking happens only once
``torch._dynamo`` is imported, by torch.compile or anyone else.
"""
import sys

_MARK = "_torchdynamo_disable"


def mark(function, code):
    """Tell dynamo to run ``code`` (installed on ``function``) without tracing it."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None:
        return False
    eval_frame.skip_code(code)
    if not getattr(function, _MARK, False):
        setattr(function, _MARK, True)
        function.__dict__["__visualizer_marked__"] = True
    return True


def unmark(function):
    """Undo ``mark`` on ``function`` (only what we set)."""
    if function.__dict__.pop("__visualizer_marked__", False):
        function.__dict__.pop(_MARK, None)
