"""The figures (matplotlib): ``visualizer.views.figures`` under the name it was first published as.

Every public name of :mod:`visualizer.views.figures` is here, so
``from visualizer import plotting`` and ``from visualizer.plotting import plot_heads``
keep working.  See that module for what each figure draws.
"""
from .views.figures import *  # noqa: F401,F403 - the public face of the figures
from .views.figures import __all__  # noqa: F401
