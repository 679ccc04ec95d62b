"""The one seam between build and serve: format version, typed manifest, write, read, verify.

`executables.py` (compile and (de)serialize an export) and `fingerprint.py` (what a serialized
executable depends on) are shared by both sides too; they import jax, so they are not imported
here: registry tools read bundles without loading jax.
"""

from aotlm.bundle.format import FORMAT_VERSION
from aotlm.bundle.manifest import DECODER, ENCODER, Manifest
from aotlm.bundle.reader import Bundle, open_bundle, read_manifest
from aotlm.bundle.writer import write_bundle

__all__ = [
    "DECODER",
    "ENCODER",
    "FORMAT_VERSION",
    "Bundle",
    "Manifest",
    "open_bundle",
    "read_manifest",
    "write_bundle",
]
