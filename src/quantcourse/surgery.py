"""Model surgery: the only module that knows how transformer families are laid out.

Algorithms elsewhere ask this module for "the decoder blocks", "the linear layers of a block",
"swap this linear for that module", "which op feeds which linears" (:func:`scale_groups`, for the
methods that fold scales: AWQ, SmoothQuant) or "record these linears' inputs while this runs"
(:func:`record_inputs`), and never name a model family. Supported: Llama-style (Llama, SmolLM2,
Mistral, Qwen2: ``model.layers``), OPT (``model.decoder.layers``) and GPT-2 (``transformer.h``, whose
``Conv1D`` layers are turned into ``nn.Linear`` first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
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
    "swapped_weights",
    "record_inputs",
    "ScaleGroup",
    "scale_groups",
    "fold_scales",
    "record_calls",
    "attention_score_linears",
    "is_norm",
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


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Put ``weights`` into the model's layers while the ``with`` block runs, then put the originals back.

    For comparing many quantized variants of one model without reloading it (chapter 3)::

        with surgery.swapped_weights(model, {"model.layers.0.mlp.down_proj": W_q}):
            nll = window_nll(model, tokens)

    The values are copied into the existing ``weight`` tensors (same objects, so optimizers and
    hooks keep pointing at them), and the originals are copied back on leaving, even on error.
    Every name and shape is checked before anything is changed.

    Args:
        model: any module; modified in place inside the block only.
        weights: ``{module path: tensor}``, each shaped like that module's ``weight``
            (``[out, in]`` for a linear layer); cast to its dtype and device.

    Yields:
        ``model``.
    """
    targets = {}
    for name, w in weights.items():
        try:
            target = getattr(get_module(model, name), "weight", None)
        except AttributeError:
            target = None
        if not isinstance(target, torch.Tensor):
            raise ValueError(f"{name!r} is not a module with a weight in this model")
        if tuple(w.shape) != tuple(target.shape):
            raise ValueError(f"{name}: the new weight has shape {tuple(w.shape)}, the layer's is {tuple(target.shape)}")
        targets[name] = target
    saved = {name: target.detach().clone() for name, target in targets.items()}
    try:
        with torch.no_grad():
            for name, target in targets.items():
                target.copy_(weights[name])
        yield model
    finally:
        with torch.no_grad():
            for name, target in targets.items():
                target.copy_(saved[name])


InputFn = Callable[[str, nn.Module, torch.Tensor], None]  # (name, module, X)


@contextlib.contextmanager
def record_inputs(
    modules: Mapping[str, nn.Module], on_input: InputFn | None = None, *, flatten: bool = True
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record what the chosen modules (usually linears) receive while the ``with`` block runs.

    One forward pre-hook per module; all are removed on leaving the block, even on error. The
    models are not changed. Typical use::

        with surgery.record_inputs({"q": block.self_attn.q_proj}) as inputs, torch.no_grad():
            model(tokens)
        X = torch.cat(inputs["q"])  # [tokens, in]

    Args:
        modules: ``{name: module}``, e.g. :func:`find_linears` of a block, or a hand-picked few.
        on_input: if given, ``on_input(name, module, X)`` is called on every call of a module instead
            of storing ``X`` (for running statistics that must not hold every batch), in execution order.
        flatten: hand over ``X`` as ``[tokens, in]`` (batch and sequence flattened; a view of the input),
            else as the module received it (``[batch, seq, in]``). Modules fed the very same tensor
            (q/k/v, gate/up) receive the very same ``X`` object either way, so a consumer can do shared
            work once (``X is previous_X``).

    Yields:
        ``{name: [X, ...]}``, one detached tensor per call, filled as the block runs (empty lists when
        ``on_input`` is given).
    """
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    last: list = [None, None]  # (the latest input tensor, what was handed over for it)

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if x is not last[0]:
                last[:] = [x, x.detach().reshape(-1, x.shape[-1]) if flatten else x.detach()]
            if on_input is None:
                recorded[name].append(last[1])
            else:
                on_input(name, module, last[1])

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
        last.clear()


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, and the op that produces it: where a per-channel scale can be folded.

    AWQ and SmoothQuant rescale the input channels of ``linears`` by ``s`` and fold ``1/s`` into
    ``prev``, whose output is that input: ``(x / s) (W diag(s))ᵀ = x Wᵀ``, so the block computes the same
    function (see :func:`fold_scales`).

    Attributes:
        name: the qualified name, inside the block, of the group's first linear (e.g. ``"self_attn.q_proj"``):
            where the block's recorded inputs of the group are found (the key llm-awq's ``input_feat`` uses).
        prev: the norm or linear whose output feeds the group (for a linear, its last ``in_features``
            outputs do: GPT-2's fused ``c_attn`` feeds ``c_proj`` through its value rows).
        linears: the linears fed by ``prev``, in block order; all have the same ``in_features``.
        inspect: the module whose output AWQ's search measures: the whole attention for q/k/v, the
            whole MLP for gate/up (Llama-style), the group's only linear otherwise, as llm-awq's
            ``auto_scale_block`` does. Attention modules need the block's keyword arguments (attention
            mask, position embeddings) to run.
    """

    name: str
    prev: nn.Module
    linears: tuple[nn.Linear, ...]
    inspect: nn.Module


def _has(module: nn.Module, *paths: str) -> bool:
    try:
        return all(isinstance(get_module(module, path), nn.Module) for path in paths)
    except AttributeError:
        return False


def _group(block: nn.Module, prev: str, linears: tuple[str, ...], inspect: str | None = None) -> ScaleGroup:
    return ScaleGroup(
        linears[0],
        get_module(block, prev),
        tuple(get_module(block, name) for name in linears),
        get_module(block, inspect or linears[0]),
    )


def _llama_groups(block: nn.Module) -> list[ScaleGroup]:
    attn = block.self_attn
    groups = [
        _group(block, "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")
    ]
    # v -> o only when o reads v's outputs one to one: not with grouped-query attention, where v has
    # fewer outputs than o has inputs (llm-awq's check, see its pull request 67).
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(_group(block, "self_attn.v_proj", ("self_attn.o_proj",)))
    groups.append(_group(block, "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"))
    groups.append(_group(block, "mlp.up_proj", ("mlp.down_proj",)))  # down reads act(gate) * up: linear in up
    return groups


def _opt_groups(block: nn.Module) -> list[ScaleGroup]:
    if not getattr(block, "do_layer_norm_before", True):
        raise ValueError(
            "this OPT model applies its layer norms after attention and MLP (do_layer_norm_before=False, "
            "as OPT-350m does): no norm feeds q/k/v or fc1, so scales cannot be folded; use another OPT size"
        )
    attn = block.self_attn
    groups = [
        _group(block, "self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")
    ]
    if attn.v_proj.weight.shape == attn.out_proj.weight.shape:
        groups.append(_group(block, "self_attn.v_proj", ("self_attn.out_proj",)))
    groups.append(_group(block, "final_layer_norm", ("fc1",)))
    groups.append(_group(block, "fc1", ("fc2",)))  # through ReLU, which commutes with a positive scale
    return groups


def _gpt2_groups(block: nn.Module) -> list[ScaleGroup]:
    if not isinstance(block.attn.c_attn, nn.Linear):
        raise ValueError(
            "GPT-2's Conv1D layers store their weight [in, out]: call quantcourse.surgery.as_plain_linears(model) "
            "first (quantcourse.pipeline.run_blockwise does), so every group holds nn.Linear [out, in]"
        )
    groups = [_group(block, "ln_1", ("attn.c_attn",), "attn")]
    if block.attn.c_attn.out_features == 3 * block.attn.c_proj.in_features:  # [q; k; v]: v is the last third
        groups.append(_group(block, "attn.c_attn", ("attn.c_proj",)))
    groups.append(_group(block, "ln_2", ("mlp.c_fc",)))
    # mlp.c_proj reads GELU(c_fc(x)): GELU does not commute with a scale, so nothing can absorb 1/s.
    # llm-awq wraps such an activation in a ScaledActivation (Bloom, MPT); here mlp.c_proj is left out.
    return groups


# Which block layout has which groups, recognised by the modules a block holds.
_FAMILIES: tuple[tuple[str, tuple[str, ...], Callable[[nn.Module], list[ScaleGroup]]], ...] = (
    (
        "Llama-style",
        ("input_layernorm", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"),
        _llama_groups,
    ),
    (
        "OPT",
        ("self_attn_layer_norm", "self_attn.v_proj", "self_attn.out_proj", "final_layer_norm", "fc1", "fc2"),
        _opt_groups,
    ),
    ("GPT-2", ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc"), _gpt2_groups),
)


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """Where a decoder block can take per-input-channel scales: each norm or linear and the linears it feeds.

    As llm-awq's ``auto_scale_block`` (``awq/quantize/auto_scale.py``), in block order:

    * Llama-style (Llama, SmolLM2, Mistral, Qwen2): ``input_layernorm`` → q/k/v (inspect: ``self_attn``);
      ``v_proj`` → ``o_proj`` only when their weights have the same shape (not with grouped-query
      attention, SmolLM2's case); ``post_attention_layernorm`` → gate/up (inspect: ``mlp``); ``up_proj`` →
      ``down_proj``.
    * OPT (pre-norm sizes): ``self_attn_layer_norm`` → q/k/v (inspect: ``self_attn``); ``v_proj`` →
      ``out_proj``; ``final_layer_norm`` → ``fc1``; ``fc1`` → ``fc2`` (through ReLU).
    * GPT-2 (after :func:`as_plain_linears`): ``ln_1`` → ``attn.c_attn`` (the fused q/k/v; inspect:
      ``attn``); ``c_attn`` (its value rows) → ``attn.c_proj``; ``ln_2`` → ``mlp.c_fc``. ``mlp.c_proj``
      has no group: its input comes through GELU, which no scale passes through.

    Args:
        block: one decoder block, e.g. ``decoder_blocks(model)[i]``.

    Returns:
        The groups; every linear of the block appears in at most one.
    """
    for _, paths, groups in _FAMILIES:
        if _has(block, *paths):
            return groups(block)
    raise ValueError(
        f"cannot tell which norm feeds which linears in a {type(block).__name__}: supported blocks are "
        f"{', '.join(family for family, _, _ in _FAMILIES)} ({'; '.join(', '.join(p) for _, p, _ in _FAMILIES)})"
    )


# Norms whose output is ``normalized(x) * weight (+ bias)``: dividing weight (and bias) by s divides the output.
_SCALABLE_NORMS = ("LayerNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm that :func:`fold_scales` can fold a scale into (``weight`` [+ ``bias``])."""
    return type(module).__name__ in _SCALABLE_NORMS


@torch.no_grad()
def fold_scales(group: ScaleGroup, scales: torch.Tensor) -> None:
    """Divide ``group.prev``'s output by ``scales`` and multiply the linears' input columns by them, in place.

    ``(x / s) (W diag(s))ᵀ = x Wᵀ``: the block computes the same function (up to float rounding), with
    the input channels of ``group.linears`` rescaled, the orientation of llm-awq's ``apply_scale`` and
    SmoothQuant's ``smooth_ln_fcs``. A norm gets ``weight / s`` (and ``bias / s``); a linear ``prev`` gets
    its last ``len(s)`` output rows and bias entries divided (GPT-2's ``c_attn``: the value rows).

    Args:
        group: from :func:`scale_groups`.
        scales: float ``[in_features]`` of the group's linears, every entry positive and finite.
    """
    in_features = group.linears[0].in_features
    if scales.shape != (in_features,) or not scales.is_floating_point():
        raise ValueError(
            f"scales must be a float tensor [{in_features}] (the group's input features), got "
            f"{scales.dtype} {tuple(scales.shape)}"
        )
    if not bool(torch.isfinite(scales).all() and (scales > 0).all()):
        raise ValueError("scales must be positive and finite: a zero or negative scale cannot be undone")
    prev = group.prev
    if isinstance(prev, nn.Linear):
        rows = slice(prev.out_features - in_features, None)
        prev.weight[rows].div_(scales.to(prev.weight).view(-1, 1))
        if prev.bias is not None:
            prev.bias[rows].div_(scales.to(prev.bias))
    elif type(prev).__name__ in _SCALABLE_NORMS:
        prev.weight.div_(scales.to(prev.weight))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(scales.to(prev.bias))
    else:
        raise ValueError(
            f"cannot fold scales into a {type(prev).__name__}: supported are nn.Linear and the norms "
            f"{', '.join(_SCALABLE_NORMS)}"
        )
    for linear in group.linears:
        linear.weight.mul_(scales.to(linear.weight).view(1, -1))


@contextlib.contextmanager
def record_calls(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, list[tuple[tuple, dict]]]]:
    """Record every call of the chosen modules, positional and keyword arguments, while the block runs.

    :func:`record_inputs` keeps what a linear receives; a module such as a whole attention also needs
    the keyword arguments the block passed it (attention mask, position embeddings) to run again on
    its own: ``module(*args, **kwargs)`` replays a recorded call. AWQ's scale search does this.

    Yields:
        ``{name: [(args, kwargs), ...]}``, one entry per call, filled as the block runs.
    """
    calls: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in modules}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[name].append((args, dict(kwargs)))

        return record

    handles = [module.register_forward_pre_hook(hook(name), with_kwargs=True) for name, module in modules.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def attention_score_linears(block: nn.Module) -> tuple[str, ...]:
    """The linears of a block whose outputs meet in the attention scores ``q·kᵀ`` (paths inside the block).

    llm-awq's clip search skips them ("due to qk bmm, it is hard to clip precisely"), matching the names
    ``q_``, ``k_``, ``query``, ``key`` and ``Wqkv``; here: Llama-style and OPT ``q_proj``/``k_proj``, and
    GPT-2's fused ``attn.c_attn`` (it holds q and k).
    """
    return tuple(name for name in find_linears(block) if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "c_attn"))
