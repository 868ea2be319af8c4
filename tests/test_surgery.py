"""quantcourse.surgery on tiny Llama, OPT and GPT-2 models (random init, no download)."""

import pytest
import torch
from tiny_models import TINY_MODELS, VOCAB, one_thread  # noqa: F401  (autouse fixture)
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantcourse import surgery

# linear layers of one decoder block, per family (GPT-2 after as_plain_linears)
BLOCK_LINEARS = {
    "llama": {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    },
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
}


def _model(family):
    return surgery.as_plain_linears(TINY_MODELS[family]())


def _tokens(n=2, seq_len=12):
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", TINY_MODELS)
def test_decoder_blocks(family):
    model = _model(family)
    blocks = surgery.decoder_blocks(model)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 2
    assert set(surgery.find_linears(blocks[0])) == BLOCK_LINEARS[family]


@pytest.mark.parametrize("family", TINY_MODELS)
def test_decoder_blocks_of_the_base_model(family):
    model = _model(family)
    base = model.get_decoder() if family != "gpt2" else model.transformer
    assert surgery.decoder_blocks(base) is surgery.decoder_blocks(model)


def test_decoder_blocks_unsupported_model():
    with pytest.raises(ValueError, match="cannot find the decoder blocks of Sequential"):
        surgery.decoder_blocks(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("family", TINY_MODELS)
def test_find_linears_names_and_head(family):
    model = _model(family)
    found = surgery.find_linears(model)
    assert len(found) == 2 * len(BLOCK_LINEARS[family])
    assert all(isinstance(m, nn.Linear) for m in found.values())
    assert not any(name.endswith("lm_head") for name in found)
    with_head = surgery.find_linears(model, include_head=True)
    assert set(with_head) - set(found) == {"lm_head"}
    for name, linear in found.items():
        assert surgery.get_module(model, name) is linear
    blocks = surgery.decoder_blocks(model)
    assert set(surgery.find_linears(blocks[1], prefix="b1.")) == {f"b1.{n}" for n in BLOCK_LINEARS[family]}


class _Recorder(nn.Module):
    """Wraps a linear layer and records that it ran."""

    def __init__(self, name, linear, seen):
        super().__init__()
        self.name, self.linear, self.seen = name, linear, seen

    def forward(self, x):
        self.seen.append(self.name)
        return self.linear(x)


@pytest.mark.parametrize("family", TINY_MODELS)
def test_replace_linears_swaps_every_selected_layer(family):
    model = _model(family)
    tokens = _tokens()
    with torch.no_grad():
        before = model(tokens).logits
    seen = []
    returned = surgery.replace_linears(model, lambda name, linear: _Recorder(name, linear, seen))
    assert returned is model
    with torch.no_grad():
        after = model(tokens).logits
    assert torch.equal(before, after)
    assert sorted(set(seen)) == sorted(f"{p}.{n}" for p in _block_prefixes(model) for n in BLOCK_LINEARS[family])
    # every linear outside the head is now wrapped: the only ones left are inside the wrappers
    assert all(name.endswith(".linear") for name in surgery.find_linears(model))
    assert isinstance(model.lm_head, nn.Linear)


def _block_prefixes(model):
    blocks = surgery.decoder_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in blocks]


def test_replace_linears_with_a_name_filter():
    model = _model("llama")
    surgery.replace_linears(model, lambda name, linear: _Recorder(name, linear, []), names=lambda n: "mlp" in n)
    unwrapped = {n for n in surgery.find_linears(model) if not n.endswith(".linear")}
    assert unwrapped == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}


def test_replace_linears_can_include_the_head():
    model = _model("opt")
    surgery.replace_linears(model, lambda name, linear: _Recorder(name, linear, []), include_head=True)
    assert isinstance(model.lm_head, _Recorder)


def test_set_and_get_module():
    model = _model("llama")
    new = nn.Linear(32, 32, bias=False)
    surgery.set_module(model, "model.layers.1.self_attn.q_proj", new)
    assert surgery.get_module(model, "model.layers.1.self_attn.q_proj") is new
    assert surgery.get_module(model, "") is model


def test_as_plain_linears_gives_identical_outputs():
    model = TINY_MODELS["gpt2"]()
    assert any(isinstance(m, Conv1D) for m in model.modules())
    tokens = _tokens()
    with torch.no_grad():
        before = model(tokens).logits
    conv = model.transformer.h[0].attn.c_attn
    assert surgery.as_plain_linears(model) is model
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    linear = model.transformer.h[0].attn.c_attn
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (96, 32)  # [out, in]
    assert torch.equal(linear.weight, conv.weight.T) and torch.equal(linear.bias, conv.bias)
    x = torch.randn(5, 32)
    # same numbers up to the order of float32 additions inside the matrix product
    torch.testing.assert_close(linear(x), conv(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        after = model(tokens).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_as_plain_linears_leaves_other_models_alone():
    model = _model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    surgery.as_plain_linears(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_linear_weight_matrices_are_views():
    model = _model("llama")
    weights = dict(surgery.linear_weight_matrices(model))
    assert len(weights) == 14
    assert weights["model.layers.0.mlp.down_proj"] is model.model.layers[0].mlp.down_proj.weight
