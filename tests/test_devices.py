"""The core functions on every device: results on CUDA (when present) equal the CPU's, and stay on the input's device.

Each test takes the ``device`` fixture (conftest.py): it runs on the CPU always, and on CUDA where there is
one (marked ``gpu``, skipped otherwise).
"""

import pytest
import torch

import quantcourse as qc
import quantcourse.gguf as qg
from quantcourse import gptq, surgery, weights


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("symmetric", [True, False])
def test_primitives_on_device(device, symmetric):
    x = _x((8, 64))
    granularity = qc.PerGroup(16)
    ref = qc.fake_quantize(x, 4, symmetric=symmetric, granularity=granularity)
    got = qc.fake_quantize(x.to(device), 4, symmetric=symmetric, granularity=granularity)
    assert got.device.type == device.type
    torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=0)
    qp = qc.choose_qparams(x.to(device), 4, symmetric=symmetric, granularity=granularity)
    ste = qc.fake_quantize_ste(x.to(device).requires_grad_(), qp)
    assert ste.device.type == device.type
    torch.testing.assert_close(ste.detach().cpu(), ref, rtol=0, atol=0)


def test_rtn_and_codebook_dequantization_on_device(device):
    W = _x((16, 64), 1)
    ref = weights.rtn_quantize(W, 4, group_size=16)
    got = weights.rtn_quantize(W.to(device), 4, group_size=16)
    assert got.codes.device.type == device.type and got.g_idx.device.type == device.type
    assert torch.equal(got.codes.cpu(), ref.codes) and torch.equal(got.weight.cpu(), ref.weight)
    levels = torch.tensor(qc.formats.FP4_E2M1.levels)
    assert qc.formats.FP4_E2M1.round(W.to(device)).device.type == device.type
    codes = torch.randint(0, len(levels), (4, 8), dtype=torch.uint8)
    args = (torch.ones(4, 1), torch.zeros(4, 1, dtype=torch.int32), torch.zeros(8, dtype=torch.long))
    on = weights.dequantize_codes(codes.to(device), *(a.to(device) for a in args), codebook=levels)
    assert torch.equal(on.cpu(), weights.dequantize_codes(codes, *args, codebook=levels))


def test_gptq_on_device_matches_the_cpu(device):
    X = _x((256, 64), 2).double()
    W = _x((8, 64), 3).double()
    H, _ = gptq.accumulate_hessian(None, 0, X.to(device))
    got = gptq.gptq_quantize(W.to(device), H, 4, group_size=16, act_order=True)
    ref = gptq.gptq_quantize(W, H.cpu(), 4, group_size=16, act_order=True)
    assert got.weight.device.type == device.type
    assert torch.equal(got.codes.cpu(), ref.codes)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_1", "Q5_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_bytes_are_the_same_on_every_device(device, name):
    x = _x((4, 512), 4)
    ref = qg.quantize(x, name)
    got = qg.quantize(x.to(device), name)
    assert got.device.type == device.type
    assert torch.equal(got.cpu(), ref)  # byte-exact: the K-quant tables are built on the input's device
    back = qg.dequantize(got, name, x.shape)
    assert back.device.type == device.type and torch.equal(back.cpu(), qg.dequantize(ref, name, x.shape))


def test_record_inputs_and_fold_scales_on_device(device):
    from tiny_models import tiny_qwen2

    model = tiny_qwen2().to(device)
    block = surgery.decoder_blocks(model)[0]
    tokens = torch.randint(0, 128, (2, 8), device=device)
    with torch.no_grad():
        before = model(tokens).logits
        for group in surgery.scale_groups(block):
            surgery.fold_scales(group, torch.rand(group.linears[0].in_features, device=device) + 0.5)
        with surgery.record_inputs(surgery.find_linears(block)) as inputs:
            after = model(tokens).logits
    assert all(x[0].device.type == device.type for x in inputs.values())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
