"""The one seam between build and serve: format version, manifest, write, read, verify."""

from aotlm.bundle.format import FORMAT_VERSION
from aotlm.bundle.reader import Bundle, open_bundle, read_manifest
from aotlm.bundle.writer import write_bundle

__all__ = ["FORMAT_VERSION", "Bundle", "open_bundle", "read_manifest", "write_bundle"]
