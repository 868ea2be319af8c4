"""Model surgery: the only module that knows how transformer families are laid out.

Algorithms elsewhere ask this module for "the decoder blocks", "the linear layers of a block" or
"swap this linear for that module" and never name a model family. Supported: Llama-style
(Llama, SmolLM2, Mistral, Qwen2: ``model.layers``), OPT (``model.decoder.layers``) and GPT-2
(``transformer.h``, whose ``Conv1D`` layers are turned into ``nn.Linear`` first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")

__all__ = [
    "decoder_blocks",
    "find_linears",
    "replace_linears",
    "set_module",
    "get_module",
    "as_plain_linears",
    "linear_weight_matrices",
    "ScaleGroup",
    "scale_groups",
    "is_norm",
    "record_inputs",
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


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a LayerNorm or an RMSNorm (``weight * x_hat`` [+ bias]): its weight can absorb a scale."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


@dataclass(frozen=True)
class ScaleGroup:
    """Linear layers that read the same tensor, and the op that produces it.

    A per-input-channel scale ``s`` of the group can be folded exactly into ``prev``: divide
    ``prev``'s output channels by ``s`` (a norm's weight and bias, or a linear's rows) and multiply the
    columns of every layer in ``linears`` by ``s``.

    Attributes:
        name: a short label within the block: ``"attn_in"`` (norm -> q/k/v), ``"mlp_in"``
            (norm -> gate/up or fc1), ``"attn_out"`` (v -> o), ``"mlp_out"`` (up -> down, fc1 -> fc2).
        prev: the module whose output is the group's input (a norm or a linear).
        linears: the layers that read it, in definition order.
        inspect: the module whose output measures the effect of quantizing ``linears`` (the whole
            attention for q/k/v, the MLP for gate/up, the layer itself otherwise).
    """

    name: str
    prev: nn.Module
    linears: tuple[nn.Linear, ...]
    inspect: nn.Module


def _has(module: nn.Module, *paths: str) -> bool:
    try:
        return all(isinstance(get_module(module, p), nn.Module) for p in paths)
    except AttributeError:
        return False


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The groups of linears of one decoder block that share an input, with the op that produces it.

    Llama-style: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, v -> o (only when
    v's outputs are o's inputs one for one, i.e. no grouped-query attention), up -> down. OPT (pre-norm
    only): self_attn_layer_norm -> q/k/v, final_layer_norm -> fc1, v -> out_proj, fc1 -> fc2 (ReLU
    commutes with positive scales). GPT-2 (after :func:`as_plain_linears`): ln_1 -> c_attn,
    ln_2 -> c_fc (GELU does not commute with scales, so nothing feeds c_proj).
    """
    g = lambda p: get_module(block, p)  # noqa: E731
    groups: list[ScaleGroup] = []
    if _has(block, "input_layernorm", "self_attn.q_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj"):
        attn, mlp = g("self_attn"), g("mlp")
        groups.append(ScaleGroup("attn_in", g("input_layernorm"), (attn.q_proj, attn.k_proj, attn.v_proj), attn))
        groups.append(ScaleGroup("mlp_in", g("post_attention_layernorm"), (mlp.gate_proj, mlp.up_proj), mlp))
        if (
            attn.v_proj.weight.shape[0] == attn.o_proj.weight.shape[1]
            and attn.q_proj.weight.shape == attn.v_proj.weight.shape
        ):
            groups.append(ScaleGroup("attn_out", attn.v_proj, (attn.o_proj,), attn.o_proj))
        groups.append(ScaleGroup("mlp_out", mlp.up_proj, (mlp.down_proj,), mlp.down_proj))
    elif _has(block, "self_attn_layer_norm", "self_attn.q_proj", "final_layer_norm", "fc1", "fc2"):
        if not getattr(block, "do_layer_norm_before", True):
            return []  # post-norm OPT (350m): no norm output feeds the linears directly
        attn = g("self_attn")
        groups.append(ScaleGroup("attn_in", g("self_attn_layer_norm"), (attn.q_proj, attn.k_proj, attn.v_proj), attn))
        groups.append(ScaleGroup("mlp_in", g("final_layer_norm"), (g("fc1"),), g("fc1")))
        groups.append(ScaleGroup("attn_out", attn.v_proj, (attn.out_proj,), attn.out_proj))
        groups.append(ScaleGroup("mlp_out", g("fc1"), (g("fc2"),), g("fc2")))
    elif _has(block, "ln_1", "attn.c_attn", "ln_2", "mlp.c_fc"):
        if not isinstance(g("attn.c_attn"), nn.Linear):
            raise ValueError("GPT-2 blocks hold Conv1D layers: call surgery.as_plain_linears(model) first")
        groups.append(ScaleGroup("attn_in", g("ln_1"), (g("attn.c_attn"),), g("attn")))
        groups.append(ScaleGroup("mlp_in", g("ln_2"), (g("mlp.c_fc"),), g("mlp")))
    else:
        raise ValueError(
            f"cannot find the norm/linear layout of {type(block).__name__}: "
            "supported blocks are Llama-style, OPT and GPT-2"
        )
    return groups


def record_inputs(
    modules: Mapping[str, nn.Module], run: Callable[[], T], on_input: Callable[[str, torch.Tensor], None]
) -> T:
    """Call ``on_input(name, x)`` with the input of each of ``modules`` while ``run()`` runs; return its result.

    ``x`` is the module's first positional input as it arrives (e.g. ``[batch, seq, in]``); layers
    that read the same tensor receive the same object, so shared work can be done once
    (``x is previous_x``). The hooks are removed afterwards, even on error.
    """
    handles = [
        module.register_forward_pre_hook(lambda mod, args, _name=name: on_input(_name, args[0]))
        for name, module in modules.items()
    ]
    try:
        return run()
    finally:
        for handle in handles:
            handle.remove()
