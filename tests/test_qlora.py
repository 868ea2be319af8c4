"""Tests of quantcourse.qlora: the forward equals peft's LoRA on bitsandbytes' Linear4bit, adapters train, errors."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
from tiny_models import VOCAB, tiny_llama

from quantcourse import nf4, qlora


def _peft_lora(base: torch.nn.Module, rank: int, alpha: float) -> PeftLinear4bit:
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0)
    return PeftLinear4bit(base, "default", config, r=rank, lora_alpha=alpha)


def _bnb_linear4bit(linear: torch.nn.Linear) -> bnb.nn.Linear4bit:
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False  # its AVX512-BF16 inference path rounds activations to bf16
    return layer


@pytest.mark.parametrize(("rank", "alpha"), [(4, 8), (8, 32), (16, 16)])
def test_forward_equals_peft_on_bitsandbytes_linear4bit(rank, alpha):
    torch.manual_seed(rank)
    linear = torch.nn.Linear(256, 96)
    reference = _peft_lora(_bnb_linear4bit(linear), rank, alpha)
    ours = qlora.LoRALinear(nf4.Linear4bit.from_float(linear), rank=rank, alpha=alpha, dropout=0.0)
    A, B = torch.randn(rank, 256) * 0.1, torch.randn(96, rank) * 0.1  # B non-zero: the adapter matters
    with torch.no_grad():
        for module_A, module_B in (
            (ours.lora_A, ours.lora_B),
            (reference.lora_A["default"], reference.lora_B["default"]),
        ):
            module_A.weight.copy_(A)
            module_B.weight.copy_(B)
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        expected = reference(x)
        got = ours(x)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    base = ours.base(x)
    assert torch.allclose(got - base, qlora.lora_forward(x, A, B, alpha / rank), atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)


def test_initialisation_equals_peft():
    linear = torch.nn.Linear(64, 32)
    bnb_base, our_base = _bnb_linear4bit(linear), nf4.Linear4bit.from_float(linear)
    torch.manual_seed(5)
    reference = _peft_lora(bnb_base, 8, 16)
    torch.manual_seed(5)
    ours = qlora.LoRALinear(our_base, rank=8, alpha=16, dropout=0.0)
    assert torch.equal(ours.lora_A.weight, reference.lora_A["default"].weight)  # Kaiming-uniform, same draws
    assert torch.count_nonzero(ours.lora_B.weight) == 0
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), ours.base(x))  # B = 0: the adapted layer starts as the base layer


def test_prepare_qlora_freezes_all_but_the_adapters():
    model = qlora.prepare_qlora(tiny_llama(), rank=4, block_size=32)
    adapters = [m for m in model.modules() if isinstance(m, qlora.LoRALinear)]
    assert len(adapters) == 2 * 2  # q_proj and v_proj of two blocks
    assert all(isinstance(m.base, nf4.Linear4bit) for m in adapters)
    trainable, total = qlora.count_trainable(model)
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in adapters)
    assert {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad} == {"weight"}
    assert 0 < trainable < total


def test_adapters_train_and_the_loss_goes_down():
    model = qlora.prepare_qlora(
        tiny_llama(), targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), rank=8, block_size=32
    )
    tokens = torch.arange(4000) % 17 % VOCAB  # a pattern the random model cannot predict yet
    frozen_before = {n: b.clone() for n, b in model.named_buffers()}
    result = qlora.finetune(model, tokens, steps=30, batch_size=4, seq_len=32, lr=2e-2, progress=False)
    assert len(result.losses) == 30
    assert sum(result.losses[-5:]) / 5 < 0.95 * sum(result.losses[:5]) / 5
    assert result.losses[-1] < 0.9 * result.losses[0]
    for name, buffer in model.named_buffers():  # the 4-bit weights never change
        assert torch.equal(buffer, frozen_before[name]), name
    assert not model.training


def test_finetune_evaluates_on_request():
    model = qlora.prepare_qlora(tiny_llama(), rank=2, block_size=32)
    tokens = torch.randint(0, VOCAB, (500,))
    calls = []
    result = qlora.finetune(
        model,
        tokens,
        steps=4,
        batch_size=2,
        seq_len=16,
        evaluate=lambda m: calls.append(m.training) or 1.0,
        evaluate_every=2,
        progress=False,
    )
    assert result.evaluations == [(2, 1.0), (4, 1.0)] and calls == [False, False]


def test_gradient_checkpointing_gives_the_same_losses():
    tokens = torch.arange(2000) % 13
    runs = []
    for checkpointing in (False, True):
        model = qlora.prepare_qlora(tiny_llama(), rank=4, dropout=0.0, block_size=32)
        runs.append(
            qlora.finetune(
                model, tokens, steps=3, batch_size=2, seq_len=16, progress=False, gradient_checkpointing=checkpointing
            ).losses
        )
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


# ---- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(rank=0), "rank must be a positive int"),
        (dict(alpha=-1), "alpha must be a positive number"),
        (dict(dropout=1.0), "dropout must be a probability"),
        (dict(targets=("nope",)), "no linear layer of the model is named nope"),
        (dict(targets="q_proj"), "targets must be a non-empty sequence"),
    ],
)
def test_bad_lora_options(options, message):
    with pytest.raises(ValueError, match=message):
        qlora.add_lora(tiny_llama(), **options)


def test_bad_finetune_inputs():
    with pytest.raises(ValueError, match="no LoRA adapters"):
        qlora.finetune(tiny_llama(), torch.arange(100), steps=1)
    model = qlora.add_lora(tiny_llama())
    with pytest.raises(ValueError, match="steps must be a positive int"):
        qlora.finetune(model, torch.arange(100), steps=0)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        qlora.finetune(model, torch.randn(100), steps=1)
    with pytest.raises(ValueError, match="not more than seq_len"):
        qlora.finetune(model, torch.arange(100), steps=1, seq_len=128)
    with pytest.raises(TypeError, match="nn.Linear or a Linear4bit"):
        qlora.LoRALinear(torch.nn.Conv1d(2, 2, 1))
