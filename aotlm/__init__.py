"""aotlm: ahead-of-time compiled language-model serving on XLA."""

__version__ = "0.1.0"
