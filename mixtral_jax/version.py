"""The package version, in a module of its own so that checkpoint metadata can record it from any layer."""

__version__ = "0.1.0"
