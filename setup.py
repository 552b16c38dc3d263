"""Packaging for visualizer.  The core needs only ``bytecode``; the rest are extras."""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, "visualizer", "__init__.py")) as fh:
    VERSION = re.search(r'^__version__ = "([^"]+)"', fh.read(), re.M).group(1)

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
    LONG_DESCRIPTION = fh.read()

# bytecode's releases follow CPython: 0.16.x is the last for 3.8, 0.17.x for
# 3.9 and 3.10, and 0.18 onwards needs 3.11.
BYTECODE = [
    'bytecode>=0.16,<0.17; python_version < "3.9"',
    'bytecode>=0.17,<0.18; python_version >= "3.9" and python_version < "3.11"',
    'bytecode>=0.18,<0.20; python_version >= "3.11"',
]

EXTRAS = {
    "torch": ["torch", "numpy"],
    "timm": ["timm", "torch", "numpy"],
    "transformers": ["transformers", "torch", "numpy"],
    "plot": ["matplotlib", "numpy", "pillow"],
    "save": ["numpy"],
    "notebooks": ["jupyter", "matplotlib", "numpy", "pillow"],
    "test": ["pytest", "numpy", "hypothesis"],
    "views": ["numpy"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
# The browser tests, outside "all": playwright drives the system's chromium
# (apt-get install chromium) and never downloads a browser of its own.
EXTRAS["pages"] = ["playwright", "pytest", "numpy", "pillow"]

setup(
    name="visualizer",
    version=VERSION,
    description="Capture attention maps and any local variable from inside a model's forward pass, by name.",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["visualizer", "visualizer.*"]),
    # the views' JavaScript and CSS, inlined into every page
    package_data={"visualizer.views.pages": ["*.js", "*.css"]},
    python_requires=">=3.8",
    install_requires=BYTECODE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["visualizer = visualizer.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.8",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
