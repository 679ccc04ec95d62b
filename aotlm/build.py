"""`aotlm build`: model.yaml -> bundle. Traces from abstract shapes; real weights are only copied."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import jaxlib

import aotlm
from aotlm.bundle import FORMAT_VERSION, write_bundle
from aotlm.bundle.format import FORMAT_NAME, WEIGHTS_FILE
from aotlm.config import BuildConfig
from aotlm.errors import CheckpointError, ConfigError
from aotlm.models import ModelConfig, load_checkpoint, read_hf_config
from aotlm.models.checkpoint import flatten_params
from aotlm.safetensors_io import serialize_safetensors
from aotlm.trace.export import aval_list, export_step, target_platforms
from aotlm.trace.signatures import StepSpec, step_specs
from aotlm.trace.steps import DONATE_ARGNUMS, step_functions

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)

# (done, total, spec, seconds) after each exported function.
Progress = Callable[[int, int, StepSpec, float], None]


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    digest: str
    functions: list[dict]  # name, bucket, file, size, seconds
    seconds: float
    total_bytes: int


def check_model_fits(build: BuildConfig, cfg: ModelConfig) -> None:
    name = build.source.name
    if build.max_seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"{name}: max_seq_len: {build.max_seq_len} is longer than the checkpoint's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window < build.max_seq_len:
        raise ConfigError(
            f"{name}: max_seq_len: {build.max_seq_len} exceeds the model's sliding_window ({window}); "
            "sliding-window attention is not supported yet: lower max_seq_len"
        )


def tokenizer_files(checkpoint: Path) -> dict[str, bytes]:
    """tokenizer.json is required; the chat template comes from its own file or tokenizer_config."""
    if not (checkpoint / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{checkpoint / 'tokenizer.json'}: missing (aotlm needs a fast tokenizer)"
        )
    files = {
        f"tokenizer/{n}": (checkpoint / n).read_bytes()
        for n in TOKENIZER_FILES
        if (checkpoint / n).is_file()
    }
    if "tokenizer/chat_template.jinja" not in files and "tokenizer/tokenizer_config.json" in files:
        template = json.loads(files["tokenizer/tokenizer_config.json"]).get("chat_template")
        if isinstance(template, str):
            files["tokenizer/chat_template.jinja"] = template.encode()
    return files


def _export_all(cfg: ModelConfig, build: BuildConfig, jobs: int, progress: Progress | None):
    fns = step_functions(cfg)
    platforms = target_platforms(build.targets)
    specs = step_specs(cfg, build)

    def one(spec: StepSpec):
        start = time.perf_counter()
        exp = export_step(fns[spec.name], spec, platforms)
        return spec, exp, time.perf_counter() - start

    results = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for done, (spec, exp, secs) in enumerate(pool.map(one, specs), start=1):
            results.append((spec, exp, secs))
            if progress:
                progress(done, len(specs), spec, secs)
    return results, platforms


def build_bundle(
    build: BuildConfig, out_dir: Path | str, *, jobs: int = 1, progress: Progress | None = None
) -> BuildResult:
    start = time.perf_counter()
    cfg = read_hf_config(build.model)
    check_model_fits(build, cfg)
    exported, platforms = _export_all(cfg, build, jobs, progress)
    files = tokenizer_files(build.model)
    params = load_checkpoint(build.model, cfg, build.dtype)
    files[WEIGHTS_FILE] = serialize_safetensors(flatten_params(params))
    functions = []
    for spec, exp, _ in exported:
        files[spec.file] = bytes(exp.serialize())
        functions.append(
            {
                "name": spec.name,
                "bucket": spec.bucket,
                "file": spec.file,
                "donate_argnums": list(DONATE_ARGNUMS[spec.name]),
                "in_avals": aval_list(exp.in_avals),
                "out_avals": aval_list(exp.out_avals),
            }
        )
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "aotlm_version": aotlm.__version__,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "name": build.name,
        "model": {"architecture": cfg.architecture, "config": cfg.to_dict()},
        "serving": {
            "dtype": build.dtype,
            "max_seq_len": build.max_seq_len,
            "page_size": build.page_size,
            "kv_pages": build.kv_pages,
            "pages_per_seq": build.pages_per_seq,
            "targets": list(build.targets),
            "platforms": list(platforms),
        },
        "buckets": {"tokens": list(build.token_buckets), "requests": list(build.request_buckets)},
        "functions": functions,
        "compiled": {},
    }
    digest = write_bundle(out_dir, manifest, files)
    rows = [
        {**f, "size": len(files[f["file"]]), "seconds": secs}
        for f, (_, _, secs) in zip(functions, exported, strict=True)
    ]
    return BuildResult(
        out_dir=Path(out_dir),
        digest=digest,
        functions=rows,
        seconds=time.perf_counter() - start,
        total_bytes=sum(len(b) for b in files.values()),
    )
