"""QLoRA: low-rank adapters trained on top of a frozen 4-bit (NF4) model.

Chapter 10 (NF4 and QLoRA) teaches this module. Papers: Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022 (arXiv:2106.09685); Dettmers et al., "QLoRA: Efficient Finetuning of
Quantized LLMs", NeurIPS 2023 (arXiv:2305.14314). Reference code: peft's ``lora.Linear`` and
``lora.bnb.Linear4bit``, whose forward this module reproduces.

A LoRA adapter beside a frozen linear layer ``W [out, in]`` adds a trainable rank-``r`` update::

    y = x Wᵀ + (alpha / r) · dropout(x) Aᵀ Bᵀ        A [r, in]  (Kaiming-uniform),  B [out, r]  (zeros)

``B = 0`` makes the adapted model start exactly where the base model is. QLoRA keeps ``W`` in NF4 with
double quantization (:class:`quantcourse.nf4.Linear4bit`) and computes in 16 or 32 bits; only ``A`` and
``B`` receive gradients, so the optimizer state covers a fraction of a percent of the parameters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .nf4 import Linear4bit, QuantType
from .nf4 import quantize_model as quantize_model_4bit

__all__ = [
    "DEFAULT_TARGETS",
    "lora_forward",
    "LoRALinear",
    "add_lora",
    "prepare_qlora",
    "lora_parameters",
    "count_trainable",
    "FinetuneResult",
    "finetune",
]

# The attention query and value projections: the original LoRA paper's choice, and the cheapest subset.
DEFAULT_TARGETS = ("q_proj", "v_proj")


def lora_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The adapter's contribution ``scaling · x Aᵀ Bᵀ`` (without dropout).

    Args:
        x: ``[..., in]``; A: ``[r, in]``; B: ``[out, r]``; scaling: ``alpha / r``.

    Returns:
        ``[..., out]``. Multiplying by ``A`` first keeps the cost at ``r·(in + out)`` per token instead of
        forming the ``[out, in]`` product ``BA``.
    """
    return (x @ A.T) @ B.T * scaling


class LoRALinear(nn.Module):
    """A frozen linear layer (``nn.Linear`` or :class:`~quantcourse.nf4.Linear4bit`) plus a LoRA adapter.

    ``forward(x) = base(x) + lora_B(lora_A(dropout(x))) · alpha / rank``, as peft's ``lora.Linear``. The
    parameters are ``lora_A.weight [rank, in]`` (Kaiming-uniform with ``a = √5``, nn.Linear's own
    initialisation, as peft) and ``lora_B.weight [out, rank]`` (zeros).
    """

    def __init__(self, base: nn.Module, *, rank: int = 8, alpha: float = 16, dropout: float = 0.05) -> None:
        super().__init__()
        _check_lora_options(rank, alpha, dropout)
        if not isinstance(base, (nn.Linear, Linear4bit)):
            raise TypeError(f"LoRA wraps an nn.Linear or a Linear4bit, got {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
        device = next(base.buffers(), None) if isinstance(base, Linear4bit) else base.weight
        device = device.device if device is not None else None
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _check_lora_options(rank: int, alpha: float, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int (LoRA uses 4 to 64), got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number (the update is scaled by alpha / rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def add_lora(
    model: nn.Module,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    seed: int = 0,
) -> nn.Module:
    """Freeze ``model`` and wrap every linear layer whose name ends in one of ``targets`` in a :class:`LoRALinear`.

    Args:
        model: a causal LM whose linear layers are ``nn.Linear`` or :class:`~quantcourse.nf4.Linear4bit`.
        targets: last components of the layer names, e.g. ``("q_proj", "v_proj")``, peft's
            ``target_modules``.
        rank, alpha, dropout: LoRA's ``r``, ``lora_alpha`` and ``lora_dropout``.
        seed: seeds the adapters' ``A`` matrices (reproducible runs).

    Returns:
        ``model``, modified in place; only the adapters' parameters require gradients.
    """
    from .surgery import set_module

    _check_lora_options(rank, alpha, dropout)
    if isinstance(targets, str) or not targets:
        raise ValueError(
            f"targets must be a non-empty sequence of layer names such as ('q_proj', 'v_proj'), got {targets!r}"
        )
    model.requires_grad_(False)
    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Linear4bit)) and name.rpartition(".")[2] in targets
    ]
    if not chosen:
        raise ValueError(f"no linear layer of the model is named {', '.join(targets)}: check `targets`")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in chosen:
            set_module(model, name, LoRALinear(model.get_submodule(name), rank=rank, alpha=alpha, dropout=dropout))
    return model


def prepare_qlora(
    model: nn.Module,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    quant_type: QuantType = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    seed: int = 0,
) -> nn.Module:
    """QLoRA's set-up: every decoder linear layer to NF4 with double quantization, then LoRA adapters.

    Returns:
        ``model`` (modified in place): frozen 4-bit base, trainable adapters on ``targets``.
    """
    quantize_model_4bit(model, quant_type=quant_type, block_size=block_size, double_quant=double_quant)
    return add_lora(model, targets=targets, rank=rank, alpha=alpha, dropout=dropout, seed=seed)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (what the optimizer updates)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A.weight, m.lora_B.weight)]


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a 4-bit weight counts its values, not its bytes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    packed = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, Linear4bit))
    return trainable, trainable + frozen + packed


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes:
        losses: the training loss of every step (next-token cross-entropy on the batch).
        seconds: wall time of the training loop.
        steps, batch_size, seq_len, lr: the settings.
        evaluations: ``(step, value)`` pairs from ``evaluate``, if one was given.
    """

    losses: list[float]
    seconds: float
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    evaluations: list[tuple[int, float]] = field(default_factory=list)


def _windows(tokens: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=gen)
    return tokens[starts[:, None] + torch.arange(seq_len)]  # [batch_size, seq_len]


def finetune(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    steps: int = 40,
    batch_size: int = 4,
    seq_len: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    evaluate: Callable[[nn.Module], float] | None = None,
    evaluate_every: int | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Train the LoRA adapters of ``model`` on random windows of ``tokens`` (next-token prediction), with AdamW.

    Args:
        model: prepared by :func:`add_lora` or :func:`prepare_qlora` (a causal LM returning ``.logits``).
        tokens: int64 ``[n_tokens]``, e.g. ``quantcourse.data.token_stream(tokenizer, "calibration")``.
        steps, batch_size, seq_len: the budget: ``steps`` batches of ``batch_size`` windows of ``seq_len``.
        lr, weight_decay: AdamW's (QLoRA uses 2e-4 on large models; a small model and a short run
            want more).
        seed: draws the windows and the dropout masks.
        gradient_checkpointing: recompute block activations in the backward pass (transformers'
            ``gradient_checkpointing_enable``): less memory, about a third more time.
        evaluate: called as ``evaluate(model)`` (in eval mode) every ``evaluate_every`` steps and at the end.
        progress: a tqdm bar showing the loss.

    Returns:
        :class:`FinetuneResult`; ``model``'s adapters are trained in place and the model is left in eval mode.
    """
    from .progress import progress_bar

    params = lora_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA adapters: call qlora.add_lora or qlora.prepare_qlora first")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError("tokens must be a 1-D integer tensor, e.g. data.token_stream(tokenizer, 'calibration')")
    if len(tokens) <= seq_len:
        raise ValueError(f"tokens holds {len(tokens)} ids, not more than seq_len={seq_len}")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    losses, evaluations = [], []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        bar = progress_bar(range(steps), desc="QLoRA fine-tune", disable=not progress)
        for step in bar:
            model.train()
            batch = _windows(tokens, batch_size, seq_len, gen).to(device)
            loss = model(batch, labels=batch, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if evaluate is not None and evaluate_every and (step + 1) % evaluate_every == 0 and step + 1 < steps:
                evaluations.append((step + 1, _evaluate(model, evaluate)))
    model.eval()
    if evaluate is not None:
        evaluations.append((steps, _evaluate(model, evaluate)))
    if gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return FinetuneResult(losses, time.perf_counter() - start, steps, batch_size, seq_len, lr, evaluations)


def _evaluate(model: nn.Module, evaluate: Callable[[nn.Module], float]) -> float:
    model.eval()
    with torch.no_grad():
        return float(evaluate(model))
