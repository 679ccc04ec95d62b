"""Registry and signature errors; both are AotlmErrors, so the CLI turns them into a clean exit."""

from __future__ import annotations

from aotlm.errors import AotlmError


class RegistryError(AotlmError):
    """A registry is unreachable, refuses a request, or serves content that fails verification."""


class SignatureError(AotlmError):
    """A key is unusable, or a bundle's signatures do not satisfy the trust policy."""
