"""bootenv: provision servers from composite images made of sub-images."""

__version__ = "0.1.0"
