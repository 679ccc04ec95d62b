"""The bundle format version and its changelog.

A reader accepts exactly the versions listed in CHANGELOG. A bundle with a newer version was
written by a newer aotlm: the error says which one, so the user upgrades aotlm or rebuilds.
"""

from __future__ import annotations

FORMAT_NAME = "aotlm-bundle"
FORMAT_VERSION = 2

# version -> (date, what changed). Add a line for every change a reader can observe.
CHANGELOG: dict[int, tuple[str, str]] = {
    1: (
        "2026-11-22",
        "First format: msgpack manifest; forward[T], logits[T,R], sample[R] exported with jax.export; "
        "weights as one safetensors file; tokenizer files; per-file sha256.",
    ),
    2: (
        "2026-11-22",
        "Compiled tier: `compiled` maps a target to its fingerprint and executables (name, bucket, "
        "file compiled/<target>/<function>_<bucket>.bin, memory analysis); `targets` maps every "
        "target to its tier, the reason, and its memory plan. Version 1 bundles still load "
        "(StableHLO tier only).",
    ),
}

MANIFEST_FILE = "manifest.msgpack"
COMPILED_DIR = "compiled/"
WEIGHTS_FILE = "weights/model.safetensors"
# Hard ceiling on the manifest size: it is read before anything is verified.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# The manifest's sha256 (the bundle digest), so a changed byte in the manifest itself is caught.
DIGEST_FILE = "manifest.sha256"
