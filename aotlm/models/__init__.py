"""Model families as pure functions over a params pytree, plus the HF checkpoint readers.

Decoders run through ``aotlm.models.decoders.forward`` (Llama, Mistral, Qwen2/3, the MoE families
in ``llama`` + ``moe``, Gemma 3 in ``gemma3``; ``read_hf_config`` rejects other decoders with a
message listing ``SUPPORTED_ARCHITECTURES``); BERT encoders through ``aotlm.models.bert``.
``aotlm.build.families`` picks the family for a checkpoint or a bundle (build and loader use it),
and its error lists every supported architecture.
"""

from aotlm.models.checkpoint import flatten_params, load_checkpoint, unflatten_params
from aotlm.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, read_hf_config
from aotlm.models.decoders import final_logits, forward
from aotlm.models.llama import abstract_params, lm_head

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "abstract_params",
    "final_logits",
    "flatten_params",
    "forward",
    "lm_head",
    "load_checkpoint",
    "read_hf_config",
    "unflatten_params",
]
