"""quantcourse.memory: the memory tables of the course's source text, KV cache, bandwidth bound."""

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from quantcourse import memory

# ../shared/sources/001_6684e8a2f0a5bcee.txt, section 27.1.1: LLaMA-7B at FP32/FP16/INT8/INT4,
# and the FP16/INT4 table for 7B, 13B and 70B.
SOURCE_TABLE = {
    "7B": {"fp32": 28, "fp16": 14, "int8": 7, "int4": 3.5},
    "13B": {"fp16": 26, "int4": 6.5},
    "70B": {"fp16": 140, "int4": 35},
}


def test_memory_table_reproduces_the_source_tables():
    rows = memory.memory_table({"7B": 7e9, "13B": 13e9, "70B": 70e9})
    assert [r["model"] for r in rows] == ["7B", "13B", "70B"]
    for row in rows:
        for fmt, gb in SOURCE_TABLE[row["model"]].items():
            assert row[fmt] == pytest.approx(gb), (row["model"], fmt)
        assert set(row) == {"model", "fp32", "fp16", "int8", "int4"}


def test_memory_table_int3_int2_rows_of_the_source():
    # section 27.9: a 7B model at INT3 is "2.6GB" (2.625 exactly) and at INT2 1.75 GB
    (row,) = memory.memory_table({"7B": 7e9}, formats=("int3", "int2", 4.25, "fp8_e4m3"))
    assert row["int3"] == pytest.approx(2.625)
    assert row["int2"] == pytest.approx(1.75)
    assert row["4.25"] == pytest.approx(7e9 * 4.25 / 8 / 1e9)
    assert row["fp8_e4m3"] == pytest.approx(7)


def test_memory_table_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'int9'"):
        memory.memory_table({"7B": 7e9}, formats=("int9",))


def test_format_bits():
    assert memory.FORMAT_BITS == {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}


@pytest.mark.parametrize(
    "n_bits, group_size, kwargs, expected",
    [
        (4, None, {}, 4.0),
        (4, 64, {}, 4.25),
        (4, 128, {}, 4.125),
        (4, 32, {"zero_point_bits": 16}, 5.0),  # GGUF Q4_1: fp16 scale + fp16 min per 32 -> 5 bits
        (4, 32, {}, 4.5),  # GGUF Q4_0: fp16 scale per 32 -> 4.5 bits
        (8, 32, {}, 8.5),  # GGUF Q8_0
        (4, 64, {"scale_bits": 32}, 4.5),
    ],
    ids=["no-groups", "g64", "g128", "q4_1", "q4_0", "q8_0", "fp32-scale"],
)
def test_bits_per_weight(n_bits, group_size, kwargs, expected):
    assert memory.bits_per_weight(n_bits, group_size, **kwargs) == pytest.approx(expected)


def test_bits_per_weight_rejects_bad_group_size():
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        memory.bits_per_weight(4, 0)


def test_model_bytes():
    assert memory.model_bytes(7_000_000_000, 4) == 3.5e9
    with pytest.raises(ValueError, match="bits_per_weight must be a positive number"):
        memory.model_bytes(10, 0)


def test_kv_cache_bytes_formula():
    # Llama-2-7B: 32 layers, 32 kv heads of 128, 4096 tokens in fp16 -> 2 GiB per sequence
    n = memory.kv_cache_bytes(n_layers=32, n_kv_heads=32, head_dim=128, seq_len=4096)
    assert n == 2 * 32 * 32 * 128 * 4096 * 2 == 2 * 1024**3
    assert (
        memory.kv_cache_bytes(n_layers=32, n_kv_heads=32, head_dim=128, seq_len=4096, batch_size=3, bytes_per_element=1)
        == 3 * n // 2
    )


def test_kv_cache_bytes_rejects_bad_argument():
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        memory.kv_cache_bytes(n_layers=2, n_kv_heads=2, head_dim=8, seq_len=0)


def test_kv_cache_bytes_for_llama_config_with_gqa():
    # the course model's shape: 30 layers, 9 query heads and 3 kv heads of 64
    config = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    expected = 2 * 30 * 3 * 64 * 2048 * 2
    assert memory.kv_cache_bytes_for(config, seq_len=2048) == expected


def test_kv_cache_bytes_for_gpt2_config_without_kv_heads():
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4)
    assert memory.kv_cache_bytes_for(config, seq_len=10, batch_size=2) == 2 * 2 * 4 * 16 * 10 * 2 * 2


def test_kv_cache_bytes_for_rejects_non_config():
    with pytest.raises(ValueError, match="lacks a field"):
        memory.kv_cache_bytes_for(object(), seq_len=10)


def test_decode_bound():
    # 14 GB of fp16 weights over 1 TB/s: at most ~71 tokens/s
    assert memory.decode_tokens_per_second_bound(bandwidth_bytes_per_s=1e12, bytes_per_token=14e9) == (
        pytest.approx(71.43, abs=0.01)
    )
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s must be a positive number"):
        memory.decode_tokens_per_second_bound(bandwidth_bytes_per_s=-1, bytes_per_token=1)


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_count_parameters_counts_tied_weights_once():
    model = _Tied()
    assert memory.count_parameters(model) == 40 + 20
    assert memory.count_parameters(model, include_embeddings=False) == 20


def test_count_parameters_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        memory.count_parameters(torch.zeros(3))


def test_model_size_report():
    report = memory.model_size_report(_Tied(), 4)
    assert report["n_params"] == 60
    assert report["n_params_non_embedding"] == 20
    assert report["bytes"] == 30
    assert report["fp32_bytes"] == report["current_bytes"] == 240
    assert report["compression_vs_fp16"] == 4
