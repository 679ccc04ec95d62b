"""Which store a reference names: an HTTP registry for oci://, an OCI image layout for file://."""

from __future__ import annotations

from aotlm.registry.http_store import HttpStore
from aotlm.registry.layout_store import LayoutStore
from aotlm.registry.ref import Ref
from aotlm.registry.store import RegistryOptions, Store


def open_store(ref: Ref, options: RegistryOptions | None = None) -> Store:
    """The store `ref` lives in: an HTTP registry for oci://, an image layout for file://."""
    options = options or RegistryOptions()
    if ref.scheme == "file":
        assert ref.path is not None
        return LayoutStore(ref.path)
    return HttpStore(ref.host, ref.repository, options)
