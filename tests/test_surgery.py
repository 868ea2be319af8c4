"""quantcourse.surgery on tiny Llama, OPT and GPT-2 models (random init, no download)."""

import dataclasses

import pytest
import torch
from tiny_models import LLAMA_STYLE_MODELS, TINY_MODELS, VOCAB, one_thread, tiny_llama, tiny_opt  # noqa: F401
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


# ---- scale groups: which op feeds which linears (AWQ, SmoothQuant) -------------------------------------

ALL_FAMILIES = {**TINY_MODELS, **LLAMA_STYLE_MODELS, "llama-mha": lambda: tiny_llama(num_key_value_heads=4)}

# (name, prev, linears, inspect) per family, names relative to the block
EXPECTED_GROUPS = {
    "llama": [
        (
            "self_attn.q_proj",
            "input_layernorm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "self_attn",
        ),
        ("mlp.gate_proj", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ("mlp.down_proj", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ],
    "opt": [
        (
            "self_attn.q_proj",
            "self_attn_layer_norm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "self_attn",
        ),
        ("self_attn.out_proj", "self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        ("fc1", "final_layer_norm", ("fc1",), "fc1"),
        ("fc2", "fc1", ("fc2",), "fc2"),
    ],
    "gpt2": [
        ("attn.c_attn", "ln_1", ("attn.c_attn",), "attn"),
        ("attn.c_proj", "attn.c_attn", ("attn.c_proj",), "attn.c_proj"),
        ("mlp.c_fc", "ln_2", ("mlp.c_fc",), "mlp.c_fc"),
    ],
}
_V_TO_O = ("self_attn.o_proj", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj")
for _family in ("mistral", "qwen2", "llama-mha"):  # multi-head attention: v -> o is foldable
    EXPECTED_GROUPS[_family] = [*EXPECTED_GROUPS["llama"][:1], _V_TO_O, *EXPECTED_GROUPS["llama"][1:]]


def _randomise_vectors(model):
    """Norm weights and biases away from their 1 / 0 initialisation, so that folding into them is tested."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_scale_groups_match_the_awq_reference(family):
    block = surgery.decoder_blocks(surgery.as_plain_linears(ALL_FAMILIES[family]()))[0]
    got = surgery.scale_groups(block)
    m = lambda path: surgery.get_module(block, path)  # noqa: E731
    expected = [(n, m(p), tuple(m(x) for x in ls), m(i)) for n, p, ls, i in EXPECTED_GROUPS[family]]
    assert [g.name for g in got] == [e[0] for e in expected]
    for g, (_, prev, linears, inspect) in zip(got, expected, strict=True):
        assert g.prev is prev and g.inspect is inspect
        assert len(g.linears) == len(linears) and all(a is b for a, b in zip(g.linears, linears, strict=True))
        assert len({lin.in_features for lin in g.linears}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        got[0].name = "x"


def test_scale_groups_skip_v_to_o_with_grouped_query_attention():
    block = surgery.decoder_blocks(tiny_llama())[0]  # 2 key/value heads for 4 query heads: v is [16, 32]
    assert block.self_attn.v_proj.weight.shape != block.self_attn.o_proj.weight.shape
    assert block.self_attn.o_proj not in {lin for g in surgery.scale_groups(block) for lin in g.linears}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_folding_scales_leaves_the_model_output_unchanged(family):
    model = _randomise_vectors(surgery.as_plain_linears(ALL_FAMILIES[family]()))
    tokens = _tokens()
    with torch.no_grad():
        before = model(tokens).logits
        gen = torch.Generator().manual_seed(5)
        changed = 0
        for block in surgery.decoder_blocks(model):
            for group in surgery.scale_groups(block):
                weights_before = [lin.weight.clone() for lin in group.linears]
                scales = torch.exp(torch.randn(group.linears[0].in_features, generator=gen))  # 0.1 .. 10
                surgery.fold_scales(group, scales)
                for lin, w in zip(group.linears, weights_before, strict=True):
                    assert torch.allclose(lin.weight, w * scales)  # input columns scaled
                    changed += 1
        after = model(tokens).logits
    assert changed >= 2 * 3
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_fold_scales_divides_a_linear_prev_by_its_last_rows():
    """GPT-2's c_attn feeds c_proj through its value rows only: q and k rows stay as they were."""
    block = surgery.decoder_blocks(surgery.as_plain_linears(TINY_MODELS["gpt2"]()))[0]
    group = next(g for g in surgery.scale_groups(block) if g.name == "attn.c_proj")
    w, b = block.attn.c_attn.weight.clone(), block.attn.c_attn.bias.clone()
    scales = torch.full((32,), 2.0)
    surgery.fold_scales(group, scales)
    assert torch.equal(block.attn.c_attn.weight[:64], w[:64]) and torch.equal(block.attn.c_attn.bias[:64], b[:64])
    assert torch.equal(block.attn.c_attn.weight[64:], w[64:] / 2) and torch.equal(
        block.attn.c_attn.bias[64:], b[64:] / 2
    )


@pytest.mark.parametrize(
    "scales,message",
    [
        (torch.ones(31), r"float tensor \[32\]"),
        (torch.ones(32, dtype=torch.long), "float tensor"),
        (torch.zeros(32), "positive and finite"),
        (torch.full((32,), float("inf")), "positive and finite"),
    ],
)
def test_error_fold_scales_bad_scales(scales, message):
    group = surgery.scale_groups(surgery.decoder_blocks(tiny_llama())[0])[0]
    with pytest.raises(ValueError, match=message):
        surgery.fold_scales(group, scales)


def test_error_fold_scales_into_an_unknown_op():
    group = surgery.ScaleGroup("x", nn.GELU(), (nn.Linear(4, 4),), nn.GELU())
    with pytest.raises(ValueError, match="cannot fold scales into a GELU: supported are nn.Linear"):
        surgery.fold_scales(group, torch.ones(4))


def test_error_scale_groups_of_an_unknown_block():
    with pytest.raises(ValueError, match="cannot tell which norm feeds which linears in a Linear: supported .*Llama"):
        surgery.scale_groups(nn.Linear(2, 2))


def test_error_scale_groups_of_gpt2_before_as_plain_linears():
    block = surgery.decoder_blocks(TINY_MODELS["gpt2"]())[0]
    with pytest.raises(ValueError, match="as_plain_linears"):
        surgery.scale_groups(block)


def test_error_scale_groups_of_a_post_norm_opt():
    model = tiny_opt()
    block = surgery.decoder_blocks(model)[0]
    block.do_layer_norm_before = False  # OPT-350m's layout
    with pytest.raises(ValueError, match="do_layer_norm_before=False"):
        surgery.scale_groups(block)


# ---- record_inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_MODELS)
def test_record_inputs_sees_what_each_linear_receives(family):
    model = _model(family)
    linears = surgery.find_linears(surgery.decoder_blocks(model)[1], prefix="model.")
    expected: dict = {name: [] for name in linears}
    handles = [
        lin.register_forward_hook(lambda m, a, o, name=name: expected[name].append(a[0].reshape(-1, a[0].shape[-1])))
        for name, lin in linears.items()
    ]
    with torch.no_grad():
        model(_tokens())
    for h in handles:
        h.remove()
    with surgery.record_inputs(linears) as got, torch.no_grad():
        model(_tokens())
    assert got.keys() == expected.keys()
    for name in linears:
        assert len(got[name]) == 1 and torch.equal(got[name][0], expected[name][0])
        assert got[name][0].shape == (24, linears[name].in_features)  # [tokens, in]
    assert not any(lin._forward_pre_hooks for lin in linears.values())  # hooks removed


def test_record_inputs_hands_linears_fed_the_same_tensor_the_same_object():
    model = tiny_llama()
    block = surgery.decoder_blocks(model)[0]
    calls = []
    record = surgery.record_inputs(surgery.find_linears(block), lambda name, lin, X: calls.append((name, X)))
    with record as got, torch.no_grad():
        model(_tokens())
    names = [name for name, _ in calls]
    assert names == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    X = dict(calls)
    assert X["self_attn.q_proj"] is X["self_attn.k_proj"] is X["self_attn.v_proj"]
    assert X["mlp.gate_proj"] is X["mlp.up_proj"] and X["mlp.up_proj"] is not X["self_attn.q_proj"]
    assert all(v == [] for v in got.values())  # a callback gets the inputs instead


def test_record_inputs_unflattened_and_hooks_removed_on_error():
    model = tiny_llama()
    q = surgery.decoder_blocks(model)[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="boom"), surgery.record_inputs({"q": q}, flatten=False) as got:
        with torch.no_grad():
            model(_tokens(2, 5))
        assert got["q"][0].shape == (2, 5, 32)
        raise RuntimeError("boom")
    assert not q._forward_pre_hooks


def test_record_calls_replays_a_module_with_the_blocks_keyword_arguments():
    from tiny_models import tiny_llama

    from quantcourse import pipeline

    model = tiny_llama()
    calibration = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs, args, kwargs = pipeline.capture_block_inputs(model, calibration, batch_size=1)
    block = surgery.decoder_blocks(model)[0]
    outputs = []
    handle = block.self_attn.register_forward_hook(lambda m, a, o: outputs.append(o[0]))
    with torch.no_grad(), surgery.record_calls({"attn": block.self_attn}) as calls:
        pipeline.BlockContext(0, "b", block, inputs, args, kwargs).run()
    handle.remove()
    assert len(calls["attn"]) == 2 and not block.self_attn._forward_pre_hooks  # one call per batch; hooks removed
    with torch.no_grad():
        for (a, k), expected in zip(calls["attn"], outputs, strict=True):
            torch.testing.assert_close(block.self_attn(*a, **k)[0], expected)


def test_attention_score_linears():
    from tiny_models import tiny_gpt2, tiny_llama

    assert surgery.attention_score_linears(surgery.decoder_blocks(tiny_llama())[0]) == (
        "self_attn.q_proj",
        "self_attn.k_proj",
    )
    gpt2 = surgery.as_plain_linears(tiny_gpt2())
    assert surgery.attention_score_linears(surgery.decoder_blocks(gpt2)[0]) == ("attn.c_attn",)


def test_swapped_weights_puts_weights_in_and_restores_them():
    model = tiny_llama()
    layers = surgery.find_linears(model)
    name = next(iter(layers))
    weight = layers[name].weight
    before = weight.detach().clone()
    new = torch.randn_like(before)
    with surgery.swapped_weights(model, {name: new}) as inside:
        assert inside is model
        assert layers[name].weight is weight  # the same tensor, changed in place
        assert torch.equal(weight, new)
    assert torch.equal(weight, before)


def test_swapped_weights_restores_them_when_the_block_raises():
    model = tiny_llama()
    layers = surgery.find_linears(model)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    new = {name: torch.zeros_like(w) for name, w in before.items()}
    with pytest.raises(RuntimeError, match="boom"), surgery.swapped_weights(model, new):
        assert all(not layer.weight.any() for layer in layers.values())
        raise RuntimeError("boom")
    for name, layer in layers.items():
        assert torch.equal(layer.weight, before[name]), name


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"model.layers.0.self_attn.q_proj": torch.zeros(1, 32)}, "shape"),
        ({"model.layers.0.no_such_layer": torch.zeros(32, 32)}, "not a module with a weight"),
        ({"model.layers.0.self_attn": torch.zeros(32, 32)}, "not a module with a weight"),
    ],
    ids=["broadcastable-shape", "unknown-name", "no-weight"],
)
def test_error_swapped_weights_changes_nothing(weights, message):
    model = tiny_llama()
    ok = "model.layers.0.mlp.down_proj"
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message), surgery.swapped_weights(model, {ok: torch.zeros(32, 64), **weights}):
        pass
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
