"""Model surgery: the only module that knows how transformer families are laid out.

Algorithms elsewhere ask this module for "the decoder blocks", "the linear layers of a block" or
"swap this linear for that module" and never name a model family. Supported: Llama-style
(Llama, SmolLM2, Mistral, Qwen2: ``model.layers``), OPT (``model.decoder.layers``) and GPT-2
(``transformer.h``, whose ``Conv1D`` layers are turned into ``nn.Linear`` first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = [
    "decoder_blocks",
    "find_linears",
    "replace_linears",
    "set_module",
    "get_module",
    "as_plain_linears",
    "linear_weight_matrices",
]

# (path to the ModuleList of decoder blocks) for each supported layout, tried in order: causal LMs
# (Llama-style, OPT, GPT-2), then the same families' base models without an LM head.
_BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "layers", "decoder.layers", "h")


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c`` for ``path == "a.b.c"`` (list indices allowed)."""
    module = root
    for part in path.split(".") if path else []:
        module = getattr(module, part)
    return module


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path`` with ``new``."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(root, parent_path), name, new)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM, in order."""
    for path in _BLOCK_PATHS:
        try:
            blocks = get_module(model, path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}: supported layouts are Llama-style, OPT "
        f"and GPT-2 ({', '.join(_BLOCK_PATHS)})"
    )


def as_plain_linears(model: nn.Module) -> nn.Module:
    """Turn GPT-2's ``Conv1D`` layers (weight ``[in, out]``) into ``nn.Linear`` (``[out, in]``), in place.

    Returns ``model`` so that every later step can assume ``nn.Linear``.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, device="meta")  # no wasted random init
            linear.weight = nn.Parameter(
                module.weight.detach().T.contiguous(), requires_grad=module.weight.requires_grad
            )
            linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
            set_module(model, name, linear)
    return model


def find_linears(module: nn.Module, *, include_head: bool = False, prefix: str = "") -> dict[str, nn.Linear]:
    """All ``nn.Linear`` submodules by qualified name.

    Args:
        module: a whole model or one decoder block.
        include_head: keep the output projection (``lm_head``); it is usually left unquantized,
            and in tied models (SmolLM2) it shares its weight with the embedding.
        prefix: prepended to every name.
    """
    found = {}
    for name, child in module.named_modules():
        if not isinstance(child, nn.Linear):
            continue
        if not include_head and name.split(".")[-1] in ("lm_head", "embed_out"):
            continue
        found[f"{prefix}{name}"] = child
    return found


def replace_linears(
    model: nn.Module,
    make: Callable[[str, nn.Linear], nn.Module],
    *,
    include_head: bool = False,
    names: Callable[[str], bool] = lambda name: True,
) -> nn.Module:
    """Swap every selected ``nn.Linear`` for ``make(name, linear)``, in place; returns ``model``."""
    for name, linear in find_linears(model, include_head=include_head).items():
        if names(name):
            set_module(model, name, make(name, linear))
    return model


def linear_weight_matrices(model: nn.Module, *, include_head: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, W [out, in])`` for every linear layer, without copying."""
    for name, linear in find_linears(model, include_head=include_head).items():
        yield name, linear.weight
