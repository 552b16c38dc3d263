"""The one error class of the package, and the warning category it uses.

Every error we raise is a ``VisualizerError`` and also the built-in exception
that fits it (``ValueError`` for a bad value, ``TypeError`` for a wrong kind
of object), so both ``except VisualizerError`` and ``except ValueError`` work.
"""


class VisualizerError(Exception):
    """Base class of every error raised by visualizer."""


class VisualizerValueError(VisualizerError, ValueError):
    """A value was wrong: an unknown variable name, a target that does not resolve."""


class VisualizerTypeError(VisualizerError, TypeError):
    """An object of the wrong kind: a class, a builtin or a generator where a function was needed."""


class CaptureWarning(UserWarning):
    """Something will not be captured (an unbound variable, a path we cannot see)."""
