"""The importance matrix (imatrix) of llama.cpp, computed from the course text.

Chapter 11 (GGUF). llama.cpp's ``llama-imatrix`` tool runs calibration text through the model and,
for every matrix multiplied by activations, accumulates the squares of its input activations per
input column; it stores the mean over tokens, ``imatrix[j] = Σ_t x_tj² / T``. Given that vector,
``quantize_row_q*_K_impl`` weights each weight's error by it (see :func:`quantcourse.gguf.quantize`).
Here the statistics are gathered from the ``nn.Linear`` layers' inputs (:func:`quantcourse.surgery.record_inputs`).
"""

from __future__ import annotations

import torch

from ..progress import progress_bar
from ..surgery import find_linears, record_inputs
from .names import gguf_name

__all__ = ["compute_imatrix"]


@torch.no_grad()
def compute_imatrix(
    model: torch.nn.Module, tokens: torch.Tensor, *, include_head: bool = True, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Mean squared input activation per input column of every linear layer.

    Args:
        model: a transformers Llama-family causal LM. Not modified (the hooks are removed afterwards).
        tokens: int64 ``[n_samples, seq_len]`` calibration sequences (``quantcourse.data.calibration_samples``).
        include_head: also collect the output projection's input (llama.cpp does).
    Returns:
        GGUF tensor name (``blk.N.attn_q.weight``; ``output.weight`` for the head) -> float32 ``[in_features]``.
    """
    if tokens.dtype != torch.int64 or tokens.ndim != 2:
        raise ValueError(f"tokens must be int64 [n_samples, seq_len], got {tokens.dtype} {tuple(tokens.shape)}")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    linears = find_linears(model, include_head=include_head)
    gguf_names = {name: gguf_name(name + ".weight", model.config.num_hidden_layers) for name in linears}

    def accumulate(name: str, linear: torch.nn.Module, X: torch.Tensor) -> None:
        X = X.to(torch.float32)  # [tokens, in]
        gname = gguf_names[name]
        sums[gname] = sums.get(gname, 0) + (X * X).sum(dim=0)
        counts[gname] = counts.get(gname, 0) + X.shape[0]

    with record_inputs(linears, accumulate):
        for row in progress_bar(tokens, desc="imatrix", disable=not progress):
            model(row[None])
    return {name: (sums[name] / counts[name]).to(torch.float32) for name in sums}
