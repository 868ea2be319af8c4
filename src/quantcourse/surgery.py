"""Model surgery: the only module that knows how transformer families are laid out.

Algorithms elsewhere ask this module for "the decoder blocks", "the linear layers of a block" or
"swap this linear for that module" and never name a model family. Supported: Llama-style
(Llama, SmolLM2, Mistral, Qwen2: ``model.layers``), OPT (``model.decoder.layers``) and GPT-2
(``transformer.h``, whose ``Conv1D`` layers are turned into ``nn.Linear`` first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
    "ScaleGroup",
    "scale_groups",
    "attention_score_linears",
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


@dataclass(frozen=True)
class ScaleGroup:
    """Linear layers that read the same input, and the op whose output that input is.

    AWQ and SmoothQuant scale the input channels of ``linears`` by ``s`` (``W ← W·diag(s)``) and fold
    ``1/s`` into ``prev``, so that the block computes the same function. Every name is a path inside
    the decoder block (``"self_attn.q_proj"``).

    Attributes:
        name: a short label for reports (``"qkv"``, ``"o"``, ``"gate_up"``, ``"down"``).
        prev: the op that produces the shared input: a norm (its weight, and bias if any, are divided
            by ``s``) or a linear layer (its last ``len(s)`` output rows and bias are divided by ``s``).
        linears: the linear layers fed by ``prev``.
        inspect: the module whose output a scale search compares (the whole attention for q/k/v, the
            whole MLP for gate/up, the layer itself otherwise), as AWQ's reference does.
    """

    name: str
    prev: str
    linears: tuple[str, ...]
    inspect: str


def _same_shape(block: nn.Module, a: str, b: str) -> bool:
    return tuple(get_module(block, a).weight.shape) == tuple(get_module(block, b).weight.shape)


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The scale groups of one decoder block, in execution order (the fold map of AWQ and SmoothQuant).

    ===========  ==========================  =========================  ==================
    family       prev                        linears                    inspect
    ===========  ==========================  =========================  ==================
    Llama-style  input_layernorm             q, k, v                    self_attn
                 v_proj (only if v and o     o_proj                     o_proj
                 have the same shape: never
                 under grouped-query attn.)
                 post_attention_layernorm    gate, up                   mlp
                 up_proj                     down_proj                  down_proj
    OPT          self_attn_layer_norm        q, k, v                    self_attn
                 v_proj                      out_proj                   out_proj
                 final_layer_norm            fc1                        fc1
                 fc1                         fc2                        fc2
    GPT-2        ln_1                        attn.c_attn (fused q/k/v)  attn
                 attn.c_attn (its v rows)    attn.c_proj                attn.c_proj
                 ln_2                        mlp.c_fc                   mlp
    ===========  ==========================  =========================  ==================

    GPT-2's ``c_fc → c_proj`` has a GELU between them, which a scale does not pass through: the
    reference wraps the activation in a scaling module for such models; this map leaves it out.
    """
    if hasattr(block, "input_layernorm") and hasattr(block, "mlp") and hasattr(block.mlp, "gate_proj"):
        groups = [
            ScaleGroup(
                "qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"
            )
        ]
        if _same_shape(block, "self_attn.v_proj", "self_attn.o_proj"):
            groups.append(ScaleGroup("o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"))
        groups.append(ScaleGroup("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
        groups.append(ScaleGroup("down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
        return groups
    if hasattr(block, "self_attn_layer_norm") and hasattr(block, "fc1"):
        groups = [
            ScaleGroup(
                "qkv", "self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"
            )
        ]
        if _same_shape(block, "self_attn.v_proj", "self_attn.out_proj"):
            groups.append(ScaleGroup("o", "self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"))
        groups += [ScaleGroup("fc1", "final_layer_norm", ("fc1",), "fc1"), ScaleGroup("fc2", "fc1", ("fc2",), "fc2")]
        return groups
    if hasattr(block, "ln_1") and hasattr(block, "attn") and hasattr(block.attn, "c_attn"):
        return [
            ScaleGroup("qkv", "ln_1", ("attn.c_attn",), "attn"),
            ScaleGroup("o", "attn.c_attn", ("attn.c_proj",), "attn.c_proj"),
            ScaleGroup("fc", "ln_2", ("mlp.c_fc",), "mlp"),
        ]
    raise ValueError(
        f"no fold map for a {type(block).__name__} block: scale_groups knows Llama-style, OPT and GPT-2 blocks"
    )


def attention_score_linears(block: nn.Module) -> tuple[str, ...]:
    """The linears whose outputs meet in the attention scores ``q·kᵀ`` (paths inside the block).

    AWQ's clip search skips them (the reference: "due to qk bmm, it is hard to clip precisely").
    """
    names = tuple(find_linears(block))
    return tuple(n for n in names if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "c_attn"))
