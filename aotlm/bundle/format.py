"""The bundle format version and its changelog.

A reader accepts FORMAT_VERSION and the versions in READABLE (older formats it still serves,
with what they lack refused per request); anything older is rebuilt, a newer one needs a newer
aotlm (the error says which). The changelog keeps every version's line, so that error can say
what an old bundle lacks.
"""

from __future__ import annotations

FORMAT_NAME = "aotlm-bundle"
FORMAT_VERSION = 12
# Older versions still read: 7 lacks sample_masked, so it serves every request but grammars;
# 8 differs only in what 9 adds (new families' config fields, mesh.ep); 9 only in what 10 adds
# (quantization, weights by kind); 10 only in what 11 adds (the fp8 KV cache, which no
# format-10 bundle holds: its model.yaml refused it); 11 only in what 12 adds (the pages' dtype
# recorded; an 11 without it has pages in the serving dtype, bfloat16 included).
READABLE = (7, 8, 9, 10, 11, 12)

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
    3: (
        "2026-11-22",
        "sample_penalized[R] (presence/frequency/repetition penalties from each row's token "
        "history, i32[R, max_seq_len]) exported per request bucket beside sample[R]; "
        "`buckets.plan` records the planner's result when model.yaml planned the ladders. "
        "Version 2 bundles still load and serve, refusing penalties with a 400 that says to rebuild. "
        "`model.kind` is `decoder` or `encoder` (absent: decoder); an encoder bundle exports "
        "embed[S,B] per (tokens = sequence length, requests = batch) bucket, records "
        "`model.pooling` and `model.normalize`, and its `serving` has no page_size, kv_pages "
        "or pages_per_seq (no KV cache). "
        "A tensor-parallel bundle (model.yaml `mesh: {tp: N}`) records `serving.mesh` "
        "({tp: N}; absent: one device), its exports carry their shardings over N devices "
        "(each `functions[]` entry lists nr_devices, in_shardings and out_shardings) and its "
        "compiled targets' fingerprints hold `mesh`.",
    ),
    4: (
        "2026-11-23",
        "Decoders record `serving.decode_steps` (K; absent: 1) and, when K > 1, export "
        "decode[R] per request bucket: up to K decode steps of R sequences in one call "
        "(forward, LM head, sample, token fed back), returning i32/f32[K, R] tokens and logprobs "
        "and [K, R, 20] top alternatives. sample[R], sample_penalized[R] and decode[R] take "
        "want_logprobs i32[R] (last for the samplers, after step for decode): when no row wants "
        "logprobs they return zeros instead of computing the log-softmax and top-k. On CPU and "
        "GPU, forward's attention is the blocked jnp path (same contract as the reference). "
        "Version 3 bundles still load and serve one step per call, always with logprobs.",
    ),
    5: (
        "2026-11-23",
        "On CPU, forward's attention is aotlm's C++ kernel, the XLA FFI custom call "
        "`aotlm_paged_attention_cpu_v1` (model.yaml `attention: {cpu: jnp}` keeps the blocked jnp "
        "path). Decoders' `serving.attention` records `cpu` (kernel or jnp) and `custom_calls`, the "
        "targets a CPU loader must have registered; it refuses the bundle before deserializing "
        "anything when one is missing. Version 4 bundles still load.",
    ),
    6: (
        "2026-12-05",
        "Only this version is read (versions 1-5 are refused with a rebuild message). Fields a "
        "v5 writer always wrote are required: model.kind and model.architecture; "
        "serving.targets, platforms; a decoder's serving.decode_steps and serving.attention "
        "(impl, kernel, block_sizes, cpu, custom_calls); `targets` with tier, reason and "
        "memory_plan; jaxlib_version.",
    ),
    7: (
        "2026-12-05",
        "Only this version is read. The samplers' and decode's per-row inputs are named pytrees "
        "(Sampling, Penalties, DecodeRows in aotlm/kernels/step_inputs.py, registered with "
        "jax.export under `aotlm.<Class>`): sample[R](logits, Sampling), "
        "sample_penalized[R](logits, Sampling, Penalties), decode[R](params, k_pages, v_pages, "
        "DecodeRows, Sampling, num_steps). The exports' input trees changed; the flat input "
        "avals are those of format 6 in the fields' order.",
    ),
    8: (
        "2026-12-06",
        "sample_masked[R](logits, Sampling, Penalties, TokenMask) exported per request bucket: "
        "sample_penalized with a token bitmask per row (TokenMask.bitmask, i32[R, ceil(V/32)], "
        "bit t % 32 of word t // 32 set = token t allowed; -1 = no constraint) applied after the "
        "penalties and before temperature / top-k / top-p / min-p; for structured output. "
        "Version 7 bundles still load and serve every request without a grammar; requests with "
        "response_format, structured_outputs or forced tool calls get a 400 that says to rebuild.",
    ),
    9: (
        "2026-12-07",
        "New decoder families: Gemma 3 (Gemma3ForCausalLM, Gemma3ForConditionalGeneration's "
        "text model) and mixtures of experts (Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, "
        "MixtralForCausalLM). A decoder's model.config gains num_experts, experts_per_token, "
        "norm_topk_prob, shared_expert_intermediate_size, layer_types, rope_local_theta, "
        "query_pre_attn_scalar and final_logit_softcapping (absent in 7-8: a dense Llama-family "
        "model); rope_scaling may be {rope_type: linear, factor}. MoE params hold stacked "
        "experts layers.we_gate/we_up [L, E, H, I], we_down [L, E, I, H], layers.router "
        "[L, H, E] (Qwen2-MoE also ws_gate/ws_up/ws_down/ws_router); Gemma 3 adds "
        "layers.post_attn_norm and layers.post_mlp_norm. `serving.mesh` may hold `ep` (experts "
        "split over it; the mesh has tp * ep devices), as do compiled fingerprints' `mesh`.",
    ),
    10: (
        "2026-12-07",
        "Quantization. `weights` records the weights' bytes and dtypes per kind (embedding, "
        "attention, mlp, experts, scales, ...). A weight-quantized bundle (model.yaml "
        "`quantization: {weights: int8 | fp8}`) stores each quantized layer tensor as "
        "layers.<name>.weight (int8 or F8_E4M3, [L, ..., in, out]) and layers.<name>.scale (f32 "
        "[L, ..., out], per output channel) and records `quantization` {weights, "
        "kv_cache_dtype, source, kept, quality}; `serving.kv_cache_dtype: fp8` (absent: the "
        "serving dtype) means e4m3 KV pages.",
    ),
    11: (
        "2026-12-07",
        "The fp8 KV cache (model.yaml `quantization: {kv_cache_dtype: fp8}`): "
        "`serving.kv_cache_dtype: fp8` means KV pages of uint8 holding float8_e4m3fn bits, "
        "with per-layer scales in the weights as kv_scale (f32 [L, 2]: keys, values), "
        "calibrated by the build; `quantization.kv_scales` {text, tokens, max} says on what.",
    ),
    12: (
        "2026-12-08",
        "`serving.kv_dtype` records the KV pages' storage dtype: uint8 (e4m3 bits) for the fp8 "
        "cache, uint16 holding bfloat16 bits for a bfloat16 model (XLA:CPU does not scatter "
        "into a bf16 pool in place), else the serving dtype.",
    ),
}

MANIFEST_FILE = "manifest.msgpack"
COMPILED_DIR = "compiled/"
WEIGHTS_FILE = "weights/model.safetensors"
# Hard ceiling on the manifest size: it is read before anything is verified.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# The manifest's sha256 (the bundle digest), so a changed byte in the manifest itself is caught.
DIGEST_FILE = "manifest.sha256"
