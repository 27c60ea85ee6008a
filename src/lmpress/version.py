"""The package version, importable without importing the package's API (saved records name it)."""

__version__ = "0.1.0"
