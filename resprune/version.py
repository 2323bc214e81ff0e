"""The one version number of resprune (read by pyproject.toml)."""

__version__ = "0.1.0"
