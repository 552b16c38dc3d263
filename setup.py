"""Packaging shim: everything is declared in pyproject.toml (PEP 621).

Kept so that tools which still call ``setup.py`` find it; ``pip install .``
and ``python -m build`` read pyproject.toml.
"""
from setuptools import setup

setup()
