"""dspt's one version number: pyproject.toml's, read from the installed package's metadata."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dspt")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
