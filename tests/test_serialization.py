"""Saving and loading a quantized model (quantcourse.serialization)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import one_thread  # noqa: F401  (autouse fixture)
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers.utils import logging as hf_logging

from quantcourse import gptq, surgery, weights
from quantcourse.packing import packed_size
from quantcourse.serialization import load_quantized, save_quantized

hf_logging.set_verbosity_error()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


CALIB = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "n_bits,group_size,act_order", [(4, 32, True), (3, 16, False), (2, None, False), (8, 64, True)]
)
def test_reload_gives_identical_weights_and_logits(tmp_path, n_bits, group_size, act_order):
    model = tiny_llama()
    q = gptq.quantize_model(
        model, CALIB, n_bits=n_bits, group_size=group_size, act_order=act_order, batch_size=4, progress=False
    )
    report = save_quantized(q, tmp_path / "m.safetensors")
    fresh = tiny_llama(seed=1)  # different random weights everywhere: all must be overwritten
    back = load_quantized(report.path, fresh)
    for name, r in q.layers.items():
        assert torch.equal(back.layers[name].weight, r.weight)
        assert torch.equal(back.layers[name].codes, r.codes)
        assert torch.equal(back.layers[name].g_idx, r.g_idx)
    x = CALIB[:2]
    assert torch.equal(fresh(x).logits, model(x).logits)
    assert back.config["n_bits"] == n_bits


def test_a_codebook_format_round_trips(tmp_path):
    """A non-uniform format (codes index a codebook, as NF4's do) is stored and read back exactly."""
    model = tiny_llama()
    codebook = torch.linspace(-1, 1, 16) ** 3  # non-uniform levels
    layers = {}
    for name, linear in surgery.find_linears(model).items():
        W = linear.weight
        scale = W.abs().reshape(W.shape[0], -1, 32).amax(-1)  # absmax per group of 32
        codes = (W / scale.repeat_interleave(32, 1)).unsqueeze(-1).sub(codebook).abs().argmin(-1).to(torch.uint8)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        weight = weights.dequantize_codes(
            codes, scale, zero, weights.consecutive_g_idx(W.shape[1], 32), codebook=codebook
        )
        layers[name] = weights.QuantizedWeight(weight, codes, scale, zero, 4, 32, True, codebook=codebook)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    report = save_quantized(weights.QuantizedModel(model, layers, {"method": "codebook"}), tmp_path / "m.safetensors")
    fresh = tiny_llama(seed=1)
    back = load_quantized(report.path, fresh)
    for name, r in layers.items():
        assert torch.equal(back.layers[name].codebook, codebook)
        assert torch.equal(back.layers[name].weight, r.weight)
    assert torch.equal(fresh(CALIB[:2]).logits, model(CALIB[:2]).logits)


def test_reported_bytes(tmp_path):
    model = tiny_llama()
    q = gptq.quantize_model(model, CALIB, n_bits=3, group_size=16, batch_size=4, progress=False)
    report = save_quantized(q, tmp_path / "m.safetensors")
    expected = 0
    for r in q.layers.values():
        out_f, in_f = r.codes.shape
        n_groups = in_f // 16
        expected += out_f * (packed_size(in_f, 3) + 4 * n_groups + packed_size(n_groups, 3))
    assert report.quantized_bytes == expected  # no g_idx stored: groups are consecutive
    assert report.n_quantized_weights == sum(r.codes.numel() for r in q.layers.values())
    assert report.bits_per_weight == pytest.approx(8 * expected / report.n_quantized_weights)
    assert report.file_bytes == (tmp_path / "m.safetensors").stat().st_size
    assert (
        report.quantized_bytes + report.float_bytes
        < report.file_bytes
        < report.quantized_bytes + report.float_bytes + 16384
    )


def test_tied_embedding_stored_once(tmp_path):
    model = tiny_llama()
    q = gptq.quantize_model(model, None, n_bits=4, group_size=32, method="rtn", progress=False)
    report = save_quantized(q, tmp_path / "m.safetensors")
    with safe_open(str(report.path), framework="pt") as f:
        keys = set(f.keys())
        aliases = json.loads(f.metadata()["aliases"])
    assert "lm_head.weight" not in keys and aliases == {"lm_head.weight": "model.embed_tokens.weight"}


def test_gpt2_round_trip(tmp_path):
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    q = gptq.quantize_model(model, CALIB, n_bits=4, group_size=32, batch_size=4, progress=False)
    report = save_quantized(q, tmp_path / "g.safetensors")
    fresh = AutoModelForCausalLM.from_config(config).eval()
    load_quantized(report.path, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(CALIB).logits, model(CALIB).logits)


def test_error_not_a_quantcourse_file(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="was not written by quantcourse"):
        load_quantized(tmp_path / "other.safetensors", tiny_llama())


def test_error_other_architecture(tmp_path):
    q = gptq.quantize_model(tiny_llama(), None, n_bits=4, group_size=32, method="rtn", progress=False)
    report = save_quantized(q, tmp_path / "m.safetensors")
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(ValueError, match="same architecture"):
        load_quantized(report.path, AutoModelForCausalLM.from_config(config))
