"""OpenAI's embeddings request and response (POST /v1/embeddings), plus vLLM's truncation field.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists;
`encoding_format` "float" (JSON numbers) or "base64" (the little-endian float32 bytes, which the
official client asks for by default and decodes with numpy). Unknown fields are ignored.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from aotlm.runtime.http.protocol import ParamError


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # vLLM's: keep this many tokens of each input (-1: the model's maximum); None refuses
    # over-long inputs with a 400.
    truncate_prompt_tokens: int | None = None

    def inputs(self) -> list[str | list[int]]:
        """One entry per embedding to return: a text, or token ids."""
        x = self.input
        if isinstance(x, str):
            return [x]
        if not x:
            raise ParamError("input", "input must not be empty")
        if isinstance(x[0], int):
            return [x]  # type: ignore[list-item]
        return list(x)  # type: ignore[arg-type]

    def check_dimensions(self, dim: int) -> None:
        if self.dimensions is not None and self.dimensions != dim:
            raise ParamError(
                "dimensions",
                f"this model's embeddings have {dim} dimensions and cannot be shortened "
                f"(got dimensions={self.dimensions}); leave it out or send {dim}",
            )


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A float32 vector as JSON numbers, or as base64 of its little-endian float32 bytes."""
    v = np.asarray(vector, dtype="<f4")
    if encoding_format == "base64":
        return base64.b64encode(v.tobytes()).decode("ascii")
    return v.tolist()


def embedding_response(
    vectors: np.ndarray, encoding_format: str, model: str, prompt_tokens: int
) -> dict[str, Any]:
    return {
        "id": f"embd-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
