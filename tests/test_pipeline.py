"""The layer-by-layer PTQ pipeline on tiny random-init Llama, OPT and GPT-2 models."""

import pytest
import torch
from tiny_models import TINY_MODELS, VOCAB, one_thread  # noqa: F401  (one_thread: autouse fixture)

from quantcourse import gptq, pipeline, surgery, weights

CONFIGS = TINY_MODELS  # llama, opt, gpt2: 2 blocks, hidden 32


def tiny(kind):
    return TINY_MODELS[kind]().requires_grad_(False)


def calib(n=6, seq=24):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", CONFIGS)
def test_blocks_see_the_model_hidden_states_when_nothing_changes(kind):
    model = tiny(kind).train()  # dropout on: the pipeline must switch it off
    seen = []
    pipeline.run_blockwise(
        model, calib(), transform_block=lambda ctx: seen.append(torch.cat(ctx.inputs)), batch_size=4, progress=False
    )
    with torch.no_grad():
        hidden = model(calib(), output_hidden_states=True).hidden_states
    assert len(seen) == len(surgery.decoder_blocks(model))
    for i, x in enumerate(seen):
        assert torch.allclose(x, hidden[i], atol=1e-5), i


@pytest.mark.parametrize("kind", CONFIGS)
def test_collect_sees_every_linear_with_tokens_by_features(kind):
    model = tiny(kind)
    calls = {}

    def collect(name, linear, X):
        assert X.shape == (X.shape[0], linear.in_features)
        calls[name] = calls.get(name, 0) + X.shape[0]

    pipeline.run_blockwise(model, calib(), collect=collect, batch_size=4, progress=False)
    assert set(calls) == set(surgery.find_linears(model))  # lm_head excluded, GPT-2's Conv1D converted
    assert set(calls.values()) == {6 * 24}


@pytest.mark.parametrize("kind", CONFIGS)
def test_next_block_sees_the_quantized_block(kind):
    """The inputs collected for block i+1 equal those of the final, fully quantized model."""
    model = tiny(kind)
    first_linear_inputs = {}

    def collect(name, linear, X):
        first_linear_inputs.setdefault(name, []).append(X.clone())

    def rtn(name, linear):
        linear.weight = torch.nn.Parameter(weights.rtn_quantize(linear.weight, 3).weight, requires_grad=False)

    pipeline.run_blockwise(model, calib(), collect=collect, quantize_linear=rtn, batch_size=3, progress=False)
    for name in first_linear_names(model):
        linear = surgery.get_module(model, name)
        got = []
        h = linear.register_forward_hook(lambda m, a, o, got=got: got.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            model(calib()[:3])
            model(calib()[3:])
        h.remove()
        assert torch.allclose(torch.cat(got), torch.cat(first_linear_inputs[name]), atol=1e-5), name
    # and it matters: the last block's inputs differ from the float model's
    assert not torch.allclose(torch.cat(first_linear_inputs[name]), _float_inputs(kind, name), atol=1e-4)


def first_linear_names(model):
    names = {id(module): name for name, module in model.named_modules()}
    return [f"{names[id(b)]}.{next(iter(surgery.find_linears(b)))}" for b in surgery.decoder_blocks(model)]


def _float_inputs(kind, name):
    model = surgery.as_plain_linears(tiny(kind))
    got = []
    h = surgery.get_module(model, name).register_forward_hook(
        lambda m, a, o: got.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        model(calib())
    h.remove()
    return torch.cat(got)


@pytest.mark.parametrize("kind", CONFIGS)
def test_quantize_model_gptq_beats_rtn_on_tiny_models(kind):
    x = calib(8, 32)
    with torch.no_grad():
        reference = tiny(kind)(x).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny(kind)
        result = gptq.quantize_model(model, x, n_bits=3, group_size=32, method=method, batch_size=4, progress=False)
        assert len(result.layers) == len(surgery.find_linears(model))
        with torch.no_grad():
            errors[method] = (model(x).logits - reference).pow(2).mean().item()
    assert errors["gptq"] < errors["rtn"]


@pytest.mark.parametrize("kind", CONFIGS)
def test_collect_stops_each_pass_after_the_last_chosen_linear(kind):
    model = surgery.as_plain_linears(tiny(kind)).eval()
    inputs, args, kwargs = pipeline.capture_block_inputs(model, calib(), batch_size=4)
    block = surgery.decoder_blocks(model)[0]
    ctx = pipeline.BlockContext(0, "b", block, inputs, args, kwargs)
    linears = ctx.linears()
    first, last = next(iter(linears)), list(linears)[-1]
    with surgery.record_inputs(linears) as full:
        ctx.run()
    got, ran_last = [], []
    handle = linears[last].register_forward_hook(lambda *a: ran_last.append(True))
    try:
        ctx.collect(lambda name, linear, X: got.append((name, X.clone())), names=lambda name: name == first)
    finally:
        handle.remove()
    assert not ran_last  # the pass stopped at the first linear's input
    assert [name for name, _ in got] == [first] * len(inputs)
    assert torch.equal(torch.cat([X for _, X in got]), torch.cat(full[first]))
    calls = []
    handle = block.register_forward_pre_hook(lambda *a: calls.append(True))
    ctx.collect(lambda name, linear, X: None, names=lambda name: False)
    handle.remove()
    assert not calls  # nothing chosen: no pass at all


def test_rtn_needs_no_data_and_runs_no_forward():
    model = tiny("llama")
    model.forward = None  # any forward pass would fail
    result = gptq.quantize_model(model, None, n_bits=4, group_size=32, method="rtn", progress=False)
    assert len(result.layers) == len(surgery.find_linears(model)) == 2 * 7


def test_capture_records_hidden_states_and_keyword_arguments():
    model = tiny("llama")
    inputs, args, kwargs = pipeline.capture_block_inputs(model, calib(5, 16), batch_size=2)
    assert [x.shape[0] for x in inputs] == [2, 2, 1]
    assert torch.allclose(torch.cat(inputs), model.model.embed_tokens(calib(5, 16)))
    assert "position_embeddings" in kwargs[0] and kwargs[0]["use_cache"] is False


def test_error_no_calibration_when_data_is_needed():
    with pytest.raises(ValueError, match="needs calibration"):
        pipeline.run_blockwise(tiny("llama"), None, collect=lambda *a: None, progress=False)


def test_error_calibration_not_token_ids():
    with pytest.raises(ValueError, match="token ids"):
        pipeline.run_blockwise(tiny("llama"), torch.randn(4, 16), collect=lambda *a: None, progress=False)


def test_error_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.capture_block_inputs(tiny("llama"), calib(), batch_size=0)


def test_error_model_without_decoder_blocks():
    with pytest.raises(ValueError, match="cannot find the decoder blocks"):
        pipeline.run_blockwise(torch.nn.Sequential(torch.nn.Linear(2, 2)), calib(), collect=lambda *a: None)


def _gptq_rerunning_the_block(model, x, batch_size, **options):
    """The reference's --true-sequential, written plainly: re-run the block (in batches) before each linear.

    Layers that share an input (q/k/v, gate/up) see the same X either way: quantizing q does not change
    what k receives. Returns the model, quantized in place.
    """
    model = surgery.as_plain_linears(model).eval()
    inputs, args, kwargs = pipeline.capture_block_inputs(model, x, batch_size=batch_size)
    names = {id(module): name for name, module in model.named_modules()}
    for index, block in enumerate(surgery.decoder_blocks(model)):
        ctx = pipeline.BlockContext(index, names[id(block)], block, inputs, args, kwargs)
        order: list[str] = []  # the linears in execution order
        record = surgery.record_inputs(ctx.linears(), lambda name, linear, X, order=order: order.append(name))
        with record, torch.no_grad():
            block(inputs[0], *args[0], **kwargs[0])
        for name in order:
            linear = ctx.linears()[name]
            with surgery.record_inputs({name: linear}) as seen:
                ctx.run()
            H, n = None, 0
            for X in seen[name]:
                H, n = gptq.accumulate_hessian(H, n, X)
            result = gptq.gptq_quantize(linear.weight, H, 3, group_size=32, **options)
            linear.weight = torch.nn.Parameter(result.weight, requires_grad=False)
        inputs = ctx.run()
    return model


@pytest.mark.parametrize("kind", CONFIGS)
def test_true_sequential_equals_rerunning_the_block_before_each_linear(kind):
    x = calib(8, 32)
    reference = _gptq_rerunning_the_block(tiny(kind), x, batch_size=3)
    model = tiny(kind)
    blocks = surgery.decoder_blocks(model)
    passes = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: passes.append(i)) for i, b in enumerate(blocks)]
    result = gptq.quantize_model(model, x, n_bits=3, group_size=32, true_sequential=True, batch_size=3, progress=False)
    for h in hooks:
        h.remove()
    assert passes == list(range(len(blocks)))  # one pass per block (the default makes two)
    assert result.config["true_sequential"] is True
    mismatched = total = 0
    for name, linear in surgery.find_linears(model).items():
        ref = surgery.get_module(reference, name).weight
        # GPTQ rounds a weight that sits on a grid midpoint either way under float32 noise (one batch of
        # 8 against batches of 3 sums the Hessian in another order): nearly all must agree
        mismatched += (linear.weight != ref).sum().item()
        total += ref.numel()
    assert mismatched / total < 0.01, mismatched / total
    with torch.no_grad():
        got, want = model(x).logits, reference(x).logits
    assert torch.allclose(got, want, atol=5e-2, rtol=0), (got - want).abs().max()
    # and it is not the default's result: later layers saw quantized inputs
    default = tiny(kind)
    gptq.quantize_model(default, x, n_bits=3, group_size=32, batch_size=3, progress=False)
    name = list(surgery.find_linears(model))[-1]
    assert not torch.equal(surgery.get_module(default, name).weight, surgery.get_module(model, name).weight)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_bfloat16_forward_computes_the_block_in_bf16_and_every_callback_in_float32(true_sequential):
    x = calib(8, 32)
    model = tiny("llama")
    products, hessian_inputs, solved = [], [], []
    hooks = [
        linear.register_forward_hook(lambda m, a, o: products.append(o.dtype))
        for linear in surgery.find_linears(model).values()
    ]
    original = gptq.gptq_quantize

    def spy(W, H, *args, **kwargs):  # the solve runs outside autocast, on float32 W and H
        solved.append((W.dtype, H.dtype, torch.is_autocast_enabled("cpu")))
        return original(W, H, *args, **kwargs)

    collector = gptq.HessianCollector.__call__

    def collect(self, name, linear, X):
        hessian_inputs.append((X.dtype, torch.is_autocast_enabled("cpu")))
        collector(self, name, linear, X)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gptq, "gptq_quantize", spy)
        mp.setattr(gptq.HessianCollector, "__call__", collect)
        result = gptq.quantize_model(
            model, x, n_bits=4, group_size=32, true_sequential=true_sequential, forward_dtype="bfloat16",
            batch_size=4, progress=False,
        )  # fmt: skip
    for h in hooks:
        h.remove()
    assert set(products) == {torch.bfloat16}  # every linear of the calibration passes multiplied in bf16
    assert {enabled for _, enabled in hessian_inputs} == {False}
    assert torch.bfloat16 in {dtype for dtype, _ in hessian_inputs}  # o_proj / down_proj get bf16 inputs
    assert set(solved) == {(torch.float32, torch.float32, False)}
    assert result.config["forward_dtype"] == "bfloat16"
    assert not torch.is_autocast_enabled("cpu")
    for linear in surgery.find_linears(model).values():
        assert linear.weight.dtype == torch.float32
    # the weights are those of a float32 run up to calibration noise: most codes equal, output as close
    reference = tiny("llama")
    gptq.quantize_model(
        reference, x, n_bits=4, group_size=32, true_sequential=true_sequential, batch_size=4, progress=False
    )
    differ = total = 0
    for name, linear in surgery.find_linears(model).items():
        differ += (linear.weight != surgery.get_module(reference, name).weight).sum().item()
        total += linear.weight.numel()
    assert 0 < differ / total < 0.1, differ / total
    with torch.no_grad():
        want = tiny("llama")(x).logits
        err_bf16, err_f32 = ((m(x).logits - want).pow(2).mean().item() for m in (model, reference))
    assert err_bf16 < 1.5 * err_f32, (err_bf16, err_f32)


def test_forward_dtype_must_be_a_half_precision_torch_dtype():
    with pytest.raises(ValueError, match="forward_dtype must be None"):
        pipeline.run_blockwise(tiny("llama"), calib(), collect=lambda *a: None, forward_dtype=torch.float64)


def test_true_sequential_shares_one_hessian_between_q_k_v(monkeypatch):
    calls = []
    original = gptq._add_upper_gram
    monkeypatch.setattr(gptq, "_add_upper_gram", lambda S, X: (calls.append(X.shape[1]), original(S, X)))
    model = tiny("llama")
    gptq.quantize_model(model, calib(), n_bits=4, group_size=32, true_sequential=True, progress=False)
    block = surgery.decoder_blocks(model)[0]
    distinct_inputs = 4  # q/k/v, o, gate/up, down
    assert len(calls) == distinct_inputs * len(surgery.decoder_blocks(model)), calls
    assert len(surgery.find_linears(block)) == 7


def test_true_sequential_needs_collect_and_quantize_and_no_transform():
    with pytest.raises(ValueError, match="true_sequential"):
        pipeline.run_blockwise(tiny("llama"), calib(), transform_block=lambda ctx: None, true_sequential=True)
    with pytest.raises(ValueError, match="true_sequential"):
        gptq.quantize_model(tiny("llama"), None, method="rtn", group_size=32, true_sequential=True, progress=False)


class _FakeLibc:
    """Records mallopt / malloc_trim calls in place of glibc."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_large_allocations_reused_sets_and_restores_glibc_limits_even_on_error(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(pipeline, "_glibc", lambda: libc)
    with pytest.raises(RuntimeError, match="inside"), pipeline._large_allocations_reused():
        assert libc.calls == [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]  # mmap off, heap kept
        raise RuntimeError("inside")
    assert libc.calls[2:] == [("mallopt", -4, 65536), ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)]


def test_true_sequential_reuses_the_heap_only_around_its_pass(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(pipeline, "_glibc", lambda: libc)
    seen_during = []

    def collect(name, linear, X):
        seen_during.append(len(libc.calls))

    def quantize(name, linear):
        pass

    pipeline.run_blockwise(tiny("llama"), calib(), collect=collect, quantize_linear=quantize, true_sequential=True,
                           progress=False)  # fmt: skip
    assert set(seen_during) == {2}  # every linear ran with mmap off and the heap kept
    assert libc.calls[-1] == ("malloc_trim", 0)
    libc.calls.clear()
    pipeline.run_blockwise(tiny("llama"), calib(), collect=collect, quantize_linear=quantize, progress=False)
    assert libc.calls == []  # the default order runs in batches: glibc's defaults serve it


def test_large_allocations_reused_leaves_other_c_libraries_alone(monkeypatch):
    monkeypatch.setattr(pipeline.sys, "platform", "darwin")
    assert pipeline._glibc() is None
    monkeypatch.setattr(pipeline.ctypes, "CDLL", lambda name: pytest.fail("loaded a C library off Linux"))
    with pipeline._large_allocations_reused():
        entered = True
    assert entered
