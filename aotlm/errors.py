"""Typed errors. The CLI turns any AotlmError into a one-line message and a non-zero exit."""

from __future__ import annotations


class AotlmError(Exception):
    """Base class for every error aotlm raises on purpose (bad input, bad bundle, ...)."""


class ConfigError(AotlmError):
    """model.yaml (or a checkpoint's config.json) is invalid; the message names the key path."""


class CheckpointError(AotlmError):
    """An HF checkpoint directory is missing files, has unsupported architecture or bad tensors."""


class BundleError(AotlmError):
    """A bundle is corrupt, incomplete or incompatible; the message names the file and what to do."""


class AdapterError(AotlmError):
    """A LoRA adapter is missing, malformed or does not fit the bundle; the message names the file
    and the field."""


class NoBucketError(AotlmError):
    """No bucket in a ladder is large enough for the requested size."""


class RequestError(AotlmError):
    """A generation request is invalid (too long, bad sampling parameters, ...)."""


class CompileAfterReadyError(AotlmError):
    """A backend compile happened after the runtime was sealed (only raised in strict mode)."""
