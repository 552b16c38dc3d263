"""visualizer: capture any local variable of any function by name, at no cost when off.

>>> from visualizer import get_local
>>> get_local.activate()
>>> @get_local('attn')
... def attention(scores):
...     attn = [s / sum(scores) for s in scores]
...     return len(attn)
>>> attention([1.0, 3.0])
2
>>> get_local.cache['attention']
[[0.25, 0.75]]
"""
from ._errors import CaptureWarning, VisualizerError
from ._get_local import get_local

__version__ = "0.1.0"
__all__ = ["get_local", "VisualizerError", "CaptureWarning", "__version__"]
