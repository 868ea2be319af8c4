"""Tests of quantcourse.gguf's block formats: golden bytes from llama.cpp, gguf-py equality, properties, errors."""

from __future__ import annotations

import importlib.util
import json
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

import quantcourse.gguf as qg
from quantcourse.gguf.cfloat import nearest_int, round_away, seq_sum, trunc_to_byte

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where golden/ lives
GOLDEN = os.path.join(HERE, "golden", "gguf", "golden.npz")
ALL = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
LEGACY = ALL[:5]
BITS = {
    "Q8_0": 8.5,
    "Q4_0": 4.5,
    "Q4_1": 5.0,
    "Q5_0": 5.5,
    "Q5_1": 6.0,
    "Q2_K": 2.625,
    "Q3_K": 3.4375,
    "Q4_K": 4.5,
    "Q5_K": 5.5,
    "Q6_K": 6.5625,
}
# relative RMS error on standard normal weights, measured, with ~25% headroom
REL_RMS = {
    "Q8_0": 0.007,
    "Q6_K": 0.023,
    "Q5_1": 0.048,
    "Q5_K": 0.045,
    "Q5_0": 0.054,
    "Q4_1": 0.098,
    "Q4_K": 0.09,
    "Q4_0": 0.108,
    "Q3_K": 0.19,
    "Q2_K": 0.375,
}


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def c_quantizer():
    """llama.cpp's own quantizers (tests/golden/gguf/cref.py); the test is skipped where the library is absent."""
    spec = importlib.util.spec_from_file_location("cref", os.path.join(HERE, "golden", "gguf", "cref.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = mod.find_libggml()
    if path is None:
        pytest.skip("llama.cpp's libggml-base.so not available (set QUANTCOURSE_LIBGGML or install llama-cpp-python)")
    return mod.CQuantizer(path)


# ---------------------------------------------------------------- golden vectors (llama.cpp's C code)


def test_golden_file_records_its_origin(golden):
    meta = json.loads(str(golden["meta"]))
    assert meta["ggml_version"] and meta["llama_cpp_python"] != "unknown"
    assert len(golden["row_names"]) == golden["x"].shape[0]


@pytest.mark.parametrize("name", ALL)
def test_bytes_equal_llama_cpp_on_hard_rows(golden, name):
    got = qg.quantize(torch.from_numpy(golden["x"]), name).numpy()
    bad = [str(golden["row_names"][i]) for i in np.nonzero((got != golden[name]).any(axis=1))[0]]
    assert not bad, f"{name} differs from llama.cpp on rows {bad}"


@pytest.mark.parametrize("name", ALL)
def test_bytes_equal_llama_cpp_on_random_rows(golden, name):
    np.testing.assert_array_equal(qg.quantize(torch.from_numpy(golden["x_random"]), name), golden[f"{name}_random"])


@pytest.mark.parametrize("name", ALL)
def test_bytes_equal_llama_cpp_on_fresh_inputs_when_library_present(c_quantizer, name):
    gen = torch.Generator().manual_seed(1234)
    for scale in (1.0, 1e-3, 50.0, 1e-41, 1e22, 1e37):
        x = torch.randn(16, 768, generator=gen) * scale
        x[:, ::5] = torch.distributions.StudentT(2.0).sample((16, 154))[:, : x[:, ::5].shape[1]] * scale
        x = x.clamp(-3e38, 3e38)
        np.testing.assert_array_equal(
            qg.quantize(x, name), c_quantizer.quantize(x.numpy(), name), err_msg=f"scale {scale}"
        )


# ---------------------------------------------------------------- gguf-py


@pytest.mark.parametrize("name", ALL)
def test_dequantize_equals_gguf_py(golden, name):
    for key in (name, f"{name}_random"):
        data = golden[key]
        cols = golden["x"].shape[1]
        ours = qg.dequantize(data, name, (data.shape[0], cols)).numpy()
        theirs = gq.dequantize(data, GGMLQuantizationType[name])
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("heavy", [False, True], ids=["normal", "student_t"])
def test_legacy_bytes_equal_gguf_py(name, heavy):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(32, 256, generator=gen)
    if heavy:
        x = x / torch.randn(32, 256, generator=gen).abs().clamp(min=0.05)
    np.testing.assert_array_equal(qg.quantize(x, name), gq.quantize(x.numpy(), GGMLQuantizationType[name]))


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ALL)
def test_bits_per_weight(name):
    assert qg.bits_per_weight(name) == BITS[name]
    x = torch.randn(4, 1024)
    assert qg.quantize(x, name).nbytes * 8 / x.numel() == BITS[name]


@pytest.mark.parametrize("name", ALL)
def test_round_trip_error_within_format(name):
    x = torch.randn(64, 512)
    x_hat = qg.dequantize(qg.quantize(x, name), name, x.shape)
    rel = ((x_hat - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()).item()
    assert rel < REL_RMS[name], f"{name}: relative RMS error {rel:.4f}"


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_0"])
def test_symmetric_formats_error_at_most_one_step(name):
    x = torch.randn(64, 256)
    fmt = qg.get_format(name)
    data = qg.quantize(x, name).reshape(-1, fmt.type_size)
    d = data[:, :2].contiguous().view(torch.float16).float().abs()  # [blocks, 1]
    err = (qg.dequantize(data.numpy(), name, x.shape) - x).abs().reshape(-1, 32)
    # half a step for Q8_0 (rounding), one step for Q4_0/Q5_0 (truncation, clamp at the top code), plus the
    # rounding of d to fp16, which moves code q by up to |q| * 2^-11 steps
    qmax = {"Q8_0": 127, "Q4_0": 8, "Q5_0": 16}[name]
    bound = d * ((0.5 if name == "Q8_0" else 1.0) + qmax / 2048) + 1e-6
    assert (err <= bound).all()


@pytest.mark.parametrize("name", ALL)
def test_zero_blocks_and_idempotence(name):
    x = torch.randn(4, 512)
    x[1] = 0
    data = qg.quantize(x, name)
    x_hat = qg.dequantize(data, name, x.shape)
    assert (x_hat[1] == 0).all()
    again = qg.quantize(x_hat, name)
    if name in ("Q8_0", "Q4_0", "Q5_0"):  # no search: grid values map back to their own codes
        np.testing.assert_array_equal(again, data)
    else:  # the searches may pick other codes for grid values, but never lose more than the first pass did
        err_again = (qg.dequantize(again, name, x.shape) - x_hat).abs().max()
        assert err_again <= (x_hat - x).abs().max(), name


@pytest.mark.parametrize("name", ALL)
def test_quantize_does_not_modify_input(name):
    x = torch.randn(2, 256)
    before = x.clone()
    qg.quantize(x, name)
    assert torch.equal(x, before)


def test_more_bits_less_error():
    x = torch.randn(32, 512)
    err = {
        n: (qg.dequantize(qg.quantize(x, n), n, x.shape) - x).pow(2).mean().item()
        for n in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    }
    assert list(err.values()) == sorted(err.values(), reverse=True)


def test_chunking_does_not_change_bytes():
    x = torch.randn(8, 512)
    np.testing.assert_array_equal(qg.quantize(x, "Q4_K", chunk_blocks=3), qg.quantize(x, "Q4_K"))


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q4_0"])
def test_threads_do_not_change_bytes_and_restore_torch_threads(name):
    x = torch.randn(16, 1024)
    imatrix = torch.rand(1024) if name == "Q6_K" else None
    before = torch.get_num_threads()
    one = qg.quantize(x, name, imatrix=imatrix, chunk_blocks=5, num_threads=1)
    np.testing.assert_array_equal(qg.quantize(x, name, imatrix=imatrix, chunk_blocks=5, num_threads=3), one)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_error_bad_threads_or_chunks(bad):
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="num_threads must be a positive int"):
        qg.quantize(x, "Q4_K", num_threads=bad)
    with pytest.raises(ValueError, match="chunk_blocks must be a positive int"):
        qg.quantize(x, "Q4_K", chunk_blocks=bad)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0+imatrix"])
def test_fast_rounding_path_equals_exact_c_rounding(monkeypatch, name):
    """The searches round with torch.round when no code can leave nearest_int's exact range;
    forcing the C bit trick everywhere must give the same bytes (tiny and huge blocks included)."""
    from quantcourse.gguf import search

    torch.manual_seed(7)
    x = torch.distributions.StudentT(2.0).sample((16, 512)) * torch.logspace(-42, 30, 16)[:, None]
    x[3, :256] = 0.0
    name, _, with_imatrix = name.partition("+")
    imatrix = torch.rand(512) if with_imatrix else None
    fast = qg.quantize(x, name, imatrix=imatrix)
    monkeypatch.setattr(search, "_SAFE", 0.0)  # no bound is below 0: always the exact path
    np.testing.assert_array_equal(qg.quantize(x, name, imatrix=imatrix), fast)


def test_qtype_enum_accepted():
    x = torch.randn(2, 256)
    np.testing.assert_array_equal(qg.quantize(x, GGMLQuantizationType.Q6_K), qg.quantize(x, "Q6_K"))


def test_scale_min_k4_packing_round_trips_every_value():
    v = torch.arange(64)
    sc = torch.stack([v.roll(k) for k in range(8)], dim=1)  # [64, 8]: every value in every slot
    m = torch.stack([v.roll(3 * k + 1) for k in range(8)], dim=1)
    packed = qg.pack_scale_min_k4(sc, m)
    assert packed.shape == (64, 12) and packed.dtype == torch.uint8
    sc2, m2 = qg.unpack_scale_min_k4(packed)
    assert torch.equal(sc2, sc.int()) and torch.equal(m2, m.int())
    # hand-checked: scale 63 in slot 4 puts its top bits (0b11) in byte 0's bits 6-7 and 0xF in byte 8
    one = qg.pack_scale_min_k4(torch.tensor([[0, 0, 0, 0, 63, 0, 0, 0]]), torch.zeros(1, 8, dtype=torch.long))
    assert one[0, 0].item() == 0xC0 and one[0, 8].item() == 0x0F


# ---------------------------------------------------------------- C float helpers


def test_nearest_int_rounds_half_to_even():
    f = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 3.0, -7.5])
    assert nearest_int(f).tolist() == [0, 2, 2, 0, -2, 2, 3, -8]


def test_roundf_rounds_half_away_from_zero():
    assert round_away(torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997])).tolist() == [1, 2, 3, -1, -3, 0]


def test_trunc_to_byte_like_x86_c_casts():
    got = trunc_to_byte(torch.tensor([8.9, -1.5, 300.0, float("inf"), float("nan"), 1e10]))
    assert got.tolist() == [8, 255, 300 & 0xFF, 0, 0, 0]


def test_seq_sum_adds_in_order():
    t = torch.tensor([[1.0], [1e8], [-1e8], [1.0]])
    assert seq_sum(t).item() == 1.0  # ((0 + 1) + 1e8) - 1e8 + 1: the first 1 is lost in float32
    assert seq_sum(t, start=torch.tensor([2.0])).item() == 1.0  # 2 + 1 + 1e8 rounds to 1e8 as well


# ---------------------------------------------------------------- errors, one per message


def test_error_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        qg.quantize(np.zeros((1, 32), np.float32), "Q8_0")


def test_error_wrong_dtype():
    with pytest.raises(TypeError, match="float32"):
        qg.quantize(torch.zeros(1, 32, dtype=torch.float64), "Q8_0")


def test_error_not_2d():
    with pytest.raises(ValueError, match="2-D"):
        qg.quantize(torch.zeros(32), "Q8_0")


def test_error_row_not_multiple_of_block():
    with pytest.raises(ValueError, match="multiple of 256"):
        qg.quantize(torch.zeros(2, 576), "Q4_K")


def test_error_nan_inf():
    x = torch.zeros(1, 32)
    x[0, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        qg.quantize(x, "Q4_0")


def test_error_unknown_type():
    with pytest.raises(ValueError, match="unknown or unsupported"):
        qg.quantize(torch.zeros(1, 32), "Q7_0")


def test_error_bad_qtype_type():
    with pytest.raises(TypeError, match="qtype"):
        qg.quantize(torch.zeros(1, 32), 8)


def test_error_dequantize_wrong_size():
    with pytest.raises(ValueError, match="takes 34 bytes"):
        qg.dequantize(np.zeros(33, np.uint8), "Q8_0", (1, 32))


def test_error_dequantize_wrong_dtype():
    with pytest.raises(TypeError, match="uint8"):
        qg.dequantize(np.zeros(34, np.int16), "Q8_0", (1, 32))


def test_error_dequantize_shape_not_multiple():
    with pytest.raises(ValueError, match="rows must be a multiple"):
        qg.dequantize(np.zeros(34, np.uint8), "Q8_0", (1, 33))


def test_gguf_py_version_has_k_quant_dequantizers():
    assert hasattr(gguf, "GGUFWriter") and GGMLQuantizationType.Q6_K in gq._type_traits


# ---------------------------------------------------------------- importance matrix (quantize_row_q*_impl)

IMATRIX = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("name", IMATRIX)
def test_imatrix_bytes_equal_llama_cpp(golden, name):
    im = torch.from_numpy(golden["imatrix"])
    for key, suffix in (("x", ""), ("x_random", "_random")):
        got = qg.quantize(torch.from_numpy(golden[key]), name, imatrix=im)
        np.testing.assert_array_equal(got, golden[f"{name}_imatrix{suffix}"], err_msg=f"{name} {key}")


@pytest.mark.parametrize("name", IMATRIX)
def test_imatrix_fresh_inputs_when_library_present(c_quantizer, name):
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(8, 768, generator=gen) / torch.randn(8, 768, generator=gen).abs().clamp(min=0.05)
    im = torch.rand(768, generator=gen) ** 2
    np.testing.assert_array_equal(qg.quantize(x, name, imatrix=im), c_quantizer.quantize(x.numpy(), name, im.numpy()))


@pytest.mark.parametrize("name", IMATRIX)
def test_imatrix_changes_the_choice_and_helps_important_columns(name):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 256, generator=gen)
    im = torch.ones(256)
    im[::8] = 100.0  # every eighth input column matters 100x more
    plain = qg.dequantize(qg.quantize(x, name), name, x.shape)
    weighted = qg.dequantize(qg.quantize(x, name, imatrix=im), name, x.shape)
    err = lambda y: ((y - x).pow(2) * im).sum().item()  # noqa: E731
    assert err(weighted) < err(plain)


def test_legacy_imatrix_uses_the_whole_rows_mean_square():
    """quantize_row_q4_0_impl's σ² is the row's: a row's other blocks change one block's bytes."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, generator=gen)
    im = torch.rand(64, generator=gen)
    louder = x.clone()
    louder[0, 32:] *= 50.0  # the second block only
    first_block = lambda y: qg.quantize(y, "Q4_0", imatrix=im)[0, :18]  # noqa: E731
    assert not np.array_equal(first_block(x), first_block(louder))
    w = qg.legacy.imatrix_weights(x, im)
    assert torch.allclose(w, im * torch.sqrt((x * x).mean() + x * x), rtol=1e-6)


@pytest.mark.parametrize("name, match", [("Q8_0", "no scale search"), ("Q2_K", "not implemented here")])
def test_error_imatrix_unsupported_format(name, match):
    with pytest.raises(ValueError, match=match):
        qg.quantize(torch.zeros(1, 256), name, imatrix=torch.ones(256))


def test_format_capabilities_are_class_attributes():
    assert qg.imatrix_formats() == ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
    assert {n: f.imatrix_sigma for n, f in qg.FORMATS.items() if f.imatrix_sigma} == {
        **dict.fromkeys(("Q4_0", "Q4_1", "Q5_0", "Q5_1"), "row"),
        **dict.fromkeys(("Q4_K", "Q5_K", "Q6_K"), "block"),
    }
    fallbacks = {n: f.fallback for n, f in qg.FORMATS.items() if f.fallback}
    assert fallbacks == {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
    for name, fmt in qg.FORMATS.items():
        assert fmt.bits_per_weight == qg.bits_per_weight(name) == fmt.type_size * 8 / fmt.block_size
        assert fmt.fallback is None or qg.get_format(fmt.fallback).block_size == 32


def test_quantize_returns_a_tensor_on_the_inputs_device_that_dequantize_takes_back():
    x = torch.randn(3, 256)
    data = qg.quantize(x, "Q4_K")
    assert isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.device == x.device
    assert torch.equal(qg.dequantize(data, "Q4_K", x.shape), qg.dequantize(data.numpy(), "Q4_K", x.shape))


def test_error_imatrix_wrong_shape():
    with pytest.raises(ValueError, match="one weight per input column"):
        qg.quantize(torch.zeros(1, 256), "Q4_K", imatrix=torch.ones(128))


def test_error_imatrix_negative():
    with pytest.raises(ValueError, match="non-negative"):
        qg.quantize(torch.zeros(1, 256), "Q4_K", imatrix=-torch.ones(256))


def test_compute_imatrix_is_mean_square_of_linear_inputs():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    tokens = torch.randint(0, 100, (3, 10))
    im = qg.compute_imatrix(model, tokens, progress=False)
    assert set(im) >= {"blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output.weight"}
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, 64)))
    with torch.no_grad():
        for row in tokens:
            model(row[None])
    h.remove()
    X = torch.cat(seen)
    torch.testing.assert_close(im["blk.1.ffn_down.weight"], (X * X).mean(0))
    assert im["blk.0.attn_k.weight"].shape == (32,)


def test_error_compute_imatrix_tokens():
    with pytest.raises(ValueError, match="int64"):
        qg.compute_imatrix(torch.nn.Linear(2, 2), torch.zeros(2, 3))
