"""Find the function a dotted path names, importing its module if needed.

``resolve('timm.layers.attention.Attention.forward')`` imports the longest
prefix that is a module (``timm.layers.attention``), then follows attributes
(``Attention``, then ``forward``).  Attributes of classes are looked up
without triggering descriptors, so a ``staticmethod`` or ``classmethod`` comes
back as itself and the caller can reach the function inside.
"""
import difflib
import importlib
import inspect

from ._errors import VisualizerTypeError, VisualizerValueError


def resolve(path):
    """Return the object named by the dotted ``path``; raise a clear error if it fails."""
    if not isinstance(path, str):
        raise VisualizerTypeError(
            "expected a dotted path such as 'timm.layers.attention.Attention.forward', "
            "got {} {!r}".format(type(path).__name__, path))
    parts = path.split(".")
    if not all(part.isidentifier() for part in parts):
        raise VisualizerValueError(
            "{!r} is not a dotted path of Python names, such as "
            "'timm.layers.attention.Attention.forward'".format(path))

    module, used = None, 0
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Stop at the first prefix that is not a module, but let an error
            # raised while importing a module that does exist propagate.
            if exc.name == name:
                break
            raise
        used = i
    if module is None:
        raise VisualizerValueError(
            "cannot resolve {!r}: there is no module named {!r} "
            "(is the package installed in this environment?)".format(path, parts[0]))

    obj = module
    for i in range(used, len(parts)):
        attr = parts[i]
        try:
            if isinstance(obj, type):
                obj = _class_attribute(obj, attr)
            else:
                obj = getattr(obj, attr)
        except AttributeError:
            done = ".".join(parts[:i])
            close = difflib.get_close_matches(attr, dir(obj), n=1)
            hint = " Did you mean {!r}?".format(close[0]) if close else ""
            raise VisualizerValueError(
                "cannot resolve {!r}: {!r} resolved, but it has no attribute {!r}.{}".format(
                    path, done, attr, hint)) from None
    return obj


def _class_attribute(cls, name):
    """``cls.name`` as stored in the class (or a base), without descriptor binding."""
    for klass in inspect.getmro(cls):
        if name in vars(klass):
            return vars(klass)[name]
    return getattr(cls, name)
