"""llama.cpp's tensor names and q/k layout for transformers Llama-family models, written once.

Chapter 11 (GGUF). A GGUF file names tensors the llama.cpp way (``blk.3.attn_q.weight`` for
``model.layers.3.self_attn.q_proj.weight``; gguf-py's ``get_tensor_name_map`` holds the table) and
stores the query and key matrices with their rows permuted: llama.cpp's rotary embedding pairs
adjacent channels of a head, the Hugging Face layout pairs its two halves, so ``convert_hf_to_gguf.py``
permutes them (:func:`permute_qk`) and transformers' GGUF loader undoes it (:func:`unpermute_qk`).
The export (:mod:`.writer`) and the importance matrix (:mod:`.imatrix`) both go through here.
"""

from __future__ import annotations

import functools

import gguf
import torch

__all__ = ["gguf_name", "permute_qk", "unpermute_qk", "to_gguf_layout", "from_gguf_layout"]


@functools.lru_cache(maxsize=8)
def _name_map(n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)


def gguf_name(hf_name: str, n_layers: int) -> str:
    """llama.cpp's name for a transformers Llama-family tensor (``model.layers.3.self_attn.q_proj.weight`` ->
    ``blk.3.attn_q.weight``; ``lm_head.weight`` -> ``output.weight``).

    Args:
        hf_name: a state-dict key (``.weight`` / ``.bias`` suffix included).
        n_layers: the model's number of decoder layers.

    Raises:
        ValueError: when llama.cpp has no name for it (not a Llama-family tensor).
    """
    name = _name_map(n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(
            f"no llama.cpp name for tensor {hf_name!r}: quantcourse.gguf supports Llama-family models "
            "(Llama, SmolLM2, Mistral) with transformers' tensor names"
        )
    return name


def permute_qk(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """``convert_hf_to_gguf``'s ``LlamaModel.permute``: per head, interleave the two rotary halves.

    Args:
        W: ``[n_head * head_dim, in]`` q_proj (``n_head`` heads) or k_proj (``n_kv_head`` heads).
    Returns:
        a new tensor of the same shape; row ``h·d + 2i + j`` = old row ``h·d + j·d/2 + i``.
    """
    return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def unpermute_qk(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk` (what transformers' GGUF loader applies)."""
    return W.reshape(n_head, W.shape[0] // n_head // 2, 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def _qk_heads(name: str, config) -> int | None:
    """Heads of a permuted tensor (query: attention heads, key: key/value heads), ``None`` for the others."""
    if name.endswith("attn_q.weight"):
        return config.num_attention_heads
    if name.endswith("attn_k.weight"):
        return config.num_key_value_heads
    return None


def to_gguf_layout(name: str, t: torch.Tensor, config) -> torch.Tensor:
    """Tensor ``name`` (GGUF name) as a GGUF file stores it: q/k permuted (:func:`permute_qk`), others as they are."""
    heads = _qk_heads(name, config)
    return t if heads is None else permute_qk(t, heads)


def from_gguf_layout(name: str, t: torch.Tensor, config) -> torch.Tensor:
    """Inverse of :func:`to_gguf_layout`: a tensor read from a GGUF file in transformers' layout."""
    heads = _qk_heads(name, config)
    return t if heads is None else unpermute_qk(t, heads)
