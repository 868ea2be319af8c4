"""Tests of quantcourse.gguf's mixture rules and GGUF writer (chapter 11)."""

from __future__ import annotations

from collections import Counter

import gguf
import numpy as np
import pytest
import torch

import quantcourse.gguf as qg

N_LAYERS = 30  # the course model


def course_shapes() -> dict[str, tuple[int, ...]]:
    """GGUF names and PyTorch shapes of the course model (SmolLM2-135M, tied embeddings)."""
    shapes = {"token_embd.weight": (49152, 576), "output_norm.weight": (576,)}
    for i in range(N_LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (576,),
            f"blk.{i}.ffn_norm.weight": (576,),
            f"blk.{i}.attn_q.weight": (576, 576),
            f"blk.{i}.attn_k.weight": (192, 576),
            f"blk.{i}.attn_v.weight": (192, 576),
            f"blk.{i}.attn_output.weight": (576, 576),
            f"blk.{i}.ffn_gate.weight": (1536, 576),
            f"blk.{i}.ffn_up.weight": (1536, 576),
            f"blk.{i}.ffn_down.weight": (576, 1536),
        }
    return shapes


def test_use_more_bits_layers_of_a_30_layer_model():
    assert [i for i in range(30) if qg.use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


@pytest.mark.parametrize(
    "mixture, expected",
    [
        ("Q4_K_M", {"Q5_0": 166, "F32": 61, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}),
        ("Q4_K_S", {"Q5_0": 176, "F32": 61, "Q4_K": 27, "Q5_K": 3, "Q5_1": 4, "Q8_0": 1}),
        ("Q5_K_M", {"Q5_1": 166, "F32": 61, "Q5_K": 16, "Q8_0": 15, "Q6_K": 14}),
        ("Q6_K", {"Q8_0": 181, "F32": 61, "Q6_K": 30}),
        ("Q4_0", {"Q4_0": 210, "F32": 61, "Q8_0": 1}),
        ("Q8_0", {"Q8_0": 211, "F32": 61}),
    ],
)
def test_course_model_type_counts(mixture, expected):
    plan = qg.plan_mixture(course_shapes(), mixture, n_layers=N_LAYERS)
    assert dict(Counter(c.qtype for c in plan.values())) == expected


def test_q4_k_m_rules_tensor_by_tensor():
    plan = qg.plan_mixture(course_shapes(), "Q4_K_M", n_layers=N_LAYERS)
    for i in range(N_LAYERS):
        more = qg.use_more_bits(i, N_LAYERS)
        assert plan[f"blk.{i}.ffn_down.weight"].qtype == ("Q6_K" if more else "Q4_K")  # 1536 = 6 * 256: no fallback
        assert plan[f"blk.{i}.attn_v.weight"].wanted == ("Q6_K" if more else "Q4_K")
        assert plan[f"blk.{i}.attn_v.weight"].qtype == ("Q8_0" if more else "Q5_0")  # 576 rows: fallback
        assert plan[f"blk.{i}.attn_q.weight"].qtype == "Q5_0" and plan[f"blk.{i}.attn_q.weight"].fell_back
    # tied embeddings: token_embd is treated as the output matrix -> Q6_K -> (576 rows) Q8_0
    assert plan["token_embd.weight"].wanted == "Q6_K" and plan["token_embd.weight"].qtype == "Q8_0"
    assert plan["output_norm.weight"].qtype == "F32"


def test_untied_output_gets_q6_k_and_embedding_keeps_base():
    shapes = {"token_embd.weight": (1000, 512), "output.weight": (1000, 512), "blk.0.attn_v.weight": (512, 512)}
    plan = qg.plan_mixture(shapes, "Q4_K_M", n_layers=1)
    assert plan["output.weight"].qtype == "Q6_K" and plan["token_embd.weight"].qtype == "Q4_K"
    assert plan["blk.0.attn_v.weight"].qtype == "Q6_K"


def test_q4_k_s_raises_first_attn_v_and_ffn_down():
    shapes = {f"blk.{i}.{n}.weight": (256, 512) for i in range(16) for n in ("attn_v", "ffn_down")}
    plan = qg.plan_mixture(shapes, "Q4_K_S", n_layers=16)
    assert [plan[f"blk.{i}.attn_v.weight"].qtype for i in range(6)] == ["Q5_K"] * 4 + ["Q4_K"] * 2
    assert [plan[f"blk.{i}.ffn_down.weight"].qtype for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]


def test_fallback_to_f16_when_no_block_fits():
    assert qg.tensor_type("blk.0.attn_q.weight", (8, 48), "Q4_K_M", n_layers=1, tied_embeddings=True).qtype == "F16"


def test_error_unknown_mixture():
    with pytest.raises(ValueError, match="unknown mixture"):
        qg.tensor_type("blk.0.attn_q.weight", (8, 256), "Q3_K_XL", n_layers=1, tied_embeddings=True)


def test_permute_round_trip_and_pairs_rotary_halves():
    W = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of dim 8
    P = qg.permute_qk(W, 2)
    assert torch.equal(qg.unpermute_qk(P, 2), W)
    # head 0: rows 0..3 are the first rotary half, 4..7 the second; llama.cpp interleaves them
    assert P[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.slow
def test_export_reads_back_and_loads_in_transformers(tmp_path, course_model):
    from transformers import AutoModelForCausalLM

    _, tok = course_model
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = qg.export_gguf(model, tok, tmp_path / "tiny.gguf", "Q4_K_M", tokenizer_pre="smollm", progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # not modified
    reader = gguf.GGUFReader(res.path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == {n: c.qtype for n, c in res.choices.items()}
    # 2 layers: use_more_bits is true for layer 1 only; 64-wide rows fall back to 32-blocks
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.1.attn_v.weight"] == "Q8_0"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    # the stored bytes are our quantizer's bytes
    weights = qg.gguf_state_dict(model)
    stored = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    np.testing.assert_array_equal(np.asarray(stored.data), qg.quantize(weights["blk.0.ffn_down.weight"], "Q4_K"))
    ids = torch.tensor([[1, 400, 2000, 31, 7, 99]])
    deq = qg.dequantized_model(model, res.path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = deq(ids).logits, loaded(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert 3.5 < res.bits_per_weight < 9


@pytest.mark.slow
def test_tokenizer_metadata_matches_the_course_gguf(tmp_path, course_model):
    from quantcourse.models import course_gguf_path

    _, tok = course_model
    res = qg.export_gguf(_tiny_model(), tok, tmp_path / "tok.gguf", "Q8_0", tokenizer_pre="smollm", progress=False)
    ours, ref = gguf.GGUFReader(res.path).fields, gguf.GGUFReader(course_gguf_path()).fields
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ):
        assert ours[key].contents() == ref[key].contents(), key


@pytest.mark.slow
def test_export_uses_the_imatrix_for_every_searched_type(tmp_path, course_model):
    _, tok = course_model
    model = _tiny_model()
    weights = qg.gguf_state_dict(model)
    gen = torch.Generator().manual_seed(0)
    imatrix = {
        n: torch.rand(t.shape[1], generator=gen) ** 2
        for n, t in weights.items()
        if n.startswith("blk.") and t.dim() == 2
    }
    res = qg.export_gguf(
        model, tok, tmp_path / "im.gguf", "Q4_K_M", tokenizer_pre="smollm", imatrix=imatrix, progress=False
    )
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(res.path).tensors}
    for name, qtype in [
        ("blk.0.attn_q.weight", "Q5_0"),
        ("blk.0.ffn_down.weight", "Q4_K"),
        ("blk.1.ffn_down.weight", "Q6_K"),
    ]:
        assert res.choices[name].qtype == qtype
        with_im = qg.quantize(weights[name], qtype, imatrix=imatrix[name])
        np.testing.assert_array_equal(stored[name], with_im, err_msg=name)
        assert not np.array_equal(with_im, qg.quantize(weights[name], qtype)), name  # the imatrix mattered
    # Q8_0 has no search: llama.cpp stores the same bytes with or without an imatrix
    np.testing.assert_array_equal(stored["blk.1.attn_v.weight"], qg.quantize(weights["blk.1.attn_v.weight"], "Q8_0"))


def test_gguf_name_refuses_a_tensor_llama_cpp_has_no_name_for():
    assert qg.gguf_name("model.layers.3.self_attn.q_proj.weight", 30) == "blk.3.attn_q.weight"
    assert qg.gguf_name("lm_head.weight", 30) == "output.weight"
    with pytest.raises(ValueError, match="no llama.cpp name for tensor 'transformer.h.0.attn.c_attn.weight'"):
        qg.gguf_name("transformer.h.0.attn.c_attn.weight", 30)


def test_dequantized_model_refuses_a_file_without_a_tensor_the_model_has(tmp_path):
    """No silent substitution: a missing tensor is an error naming it, not another tensor's weights."""
    from tiny_models import tiny_llama

    model = tiny_llama()
    path = tmp_path / "partial.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())  # nothing else
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="has no tensor 'blk.0.attn_q.weight' for the model's"):
        qg.dequantized_model(model, path)
