"""The grader's wire format: values round-trip, and frames from the untrusted side are checked."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from quantcourse import primitives
from quantcourse.grading.wire import Decoder, Encoder, WireError, read_frame, write_frame


def _roundtrip(value):
    encoder = Encoder()
    node = encoder.encode(value)
    read, write = os.pipe()
    try:
        write_frame(write, {"v": node}, encoder.blobs)
        header, blobs = read_frame(read)
    finally:
        os.close(read)
        os.close(write)
    return Decoder(blobs).decode(header["v"])


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.bool],
)
def test_tensors_round_trip_bit_for_bit(dtype):
    x = (torch.randn(3, 5, 7) * 50).to(dtype)
    y = _roundtrip(x.transpose(0, 2))  # not contiguous on the way in
    assert y.dtype == dtype and y.shape == (7, 5, 3)
    assert torch.equal(
        y.view(torch.uint8) if dtype != torch.bool else y,
        x.transpose(0, 2).contiguous().view(torch.uint8) if dtype != torch.bool else x.transpose(0, 2),
    )


def test_containers_scalars_and_library_records_round_trip():
    qp = primitives.choose_qparams(torch.randn(4, 8), 4)
    value = {
        "a": [1, 2.5, float("inf"), None, True, "s", b"\x00\x01"],
        "t": (torch.zeros(0, 3), np.arange(6, dtype=np.int16).reshape(2, 3)),
        "big": 2**80,
        "dtype": torch.float16,
        "slice": slice(1, None, 2),
        "qp": qp,
    }
    out = _roundtrip(value)
    assert out["a"][:2] == [1, 2.5] and out["a"][2] == float("inf") and out["a"][3:] == [None, True, "s", b"\x00\x01"]
    assert (
        out["t"][0].shape == (0, 3) and out["t"][1].dtype == np.int16 and out["t"][1].tolist() == [[0, 1, 2], [3, 4, 5]]
    )
    assert out["big"] == 2**80 and out["dtype"] is torch.float16 and out["slice"] == slice(1, None, 2)
    assert type(out["qp"]) is type(qp) and torch.equal(out["qp"].scale, qp.scale)


def test_requires_grad_travels():
    x = torch.randn(3, requires_grad=True)
    assert _roundtrip(x).requires_grad


@pytest.mark.parametrize(
    ("node", "blobs", "match"),
    [
        ({"t": "tensor", "dtype": "float32", "shape": [10**6], "b": 0}, [b"\x00" * 8], "bytes of data"),
        ({"t": "tensor", "dtype": "object", "shape": [1], "b": 0}, [b"\x00"], "dtype"),
        ({"t": "tensor", "dtype": "float32", "shape": [2], "b": 3}, [b"\x00" * 8], "blob"),
        ({"t": "obj", "cls": "os:system", "f": {}}, [], "not accepted"),
        ({"t": "obj", "cls": "quantcourse.grading.sandbox:Sandbox", "f": {}}, [], "not accepted"),
        ({"t": "pickle", "v": "gASV"}, [], "not accepted"),
        ({"t": "ndarray", "dtype": "|O", "shape": [1], "b": 0}, [b"\x00" * 8], "not accepted"),
        ([1, 2], [], "untagged"),
    ],
)
def test_malformed_or_hostile_values_are_refused(node, blobs, match):
    with pytest.raises(WireError, match=match):
        Decoder(blobs).decode(node)


def test_deep_nesting_is_refused():
    node = "x"
    for _ in range(200):
        node = {"t": "list", "v": [node]}
    with pytest.raises(WireError, match="nested"):
        Decoder([]).decode(node)


def test_oversized_frames_are_refused():
    read, write = os.pipe()
    try:
        os.write(write, (10**12).to_bytes(8, "big"))
        with pytest.raises(WireError, match="over the limit"):
            read_frame(read)
    finally:
        os.close(read)
        os.close(write)


def test_unsendable_objects_say_so():
    with pytest.raises(WireError, match="cannot be sent"):
        Encoder().encode(object())
