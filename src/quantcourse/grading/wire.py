"""The grader's wire format: values as JSON plus raw byte blobs, framed on a pipe; never pickle.

The trusted grader and the sandboxed worker that runs a student's code talk over two pipes. Everything
that crosses them is a *frame*: an 8-byte big-endian header length, the header (UTF-8 JSON), then the
blobs the header lists (their lengths are in it). Values are encoded as a JSON tree whose leaves are
JSON scalars and whose tagged nodes (``{"t": ...}``) stand for containers, tensors and arrays:

===========  ============================================================================
``tensor``   ``dtype`` (name), ``shape``, ``b`` (blob index: the raw bytes, C order), ``rg``
             (requires grad), ``i`` (position in the message's tensor list)
``ndarray``  NumPy array: ``dtype`` (``np.dtype.str``, numeric kinds only), ``shape``, ``b``
``list``/``tuple``/``dict``/``set``  containers (``dict`` as parallel ``k``/``v`` lists)
``obj``      a dataclass or named tuple of the ``quantcourse`` library (``cls``, ``f`` fields)
``ref``      a handle to an object that stays on the worker's side (a student's function)
===========  ============================================================================

Decoding builds only these types: a frame from the untrusted side can claim anything, so every size,
dtype, depth and class is checked against the header and a whitelist before memory is touched.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import select
import time

import numpy as np
import torch

__all__ = ["WireError", "Encoder", "Decoder", "write_frame", "read_frame", "MAX_FRAME_BYTES"]

MAX_FRAME_BYTES = 512 * 2**20  # one message, header and blobs together
MAX_HEADER_BYTES = 64 * 2**20
MAX_DEPTH = 64
MAX_NODES = 2_000_000

_TORCH_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    )
}
for _name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _TORCH_DTYPES[_name] = getattr(torch, _name)
_NUMPY_KINDS = set("biufc")
_CUDA = torch.device("cuda") if torch.cuda.is_available() else None


class WireError(ValueError):
    """A frame or a value that cannot be sent or was not well formed."""


# ------------------------------------------------------------------------------------------------ framing


def write_frame(fd: int, header: dict, blobs: list[bytes] = ()) -> None:
    """Write one frame (header + blobs) to the file descriptor ``fd``."""
    header = dict(header, blobs=[len(b) for b in blobs])
    data = json.dumps(header, allow_nan=True, separators=(",", ":")).encode()
    parts = [len(data).to_bytes(8, "big"), data, *blobs]
    for part in parts:
        view = memoryview(part)
        while view:
            written = os.write(fd, view)
            view = view[written:]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError("no reply before the deadline")
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, *, deadline: float | None = None, max_bytes: int = MAX_FRAME_BYTES) -> tuple[dict, list]:
    """Read one frame from ``fd``; ``deadline`` is a ``time.monotonic()`` value (``None``: wait forever).

    Raises:
        TimeoutError: the deadline passed. EOFError: the pipe closed. WireError: a malformed frame.
    """
    size = int.from_bytes(_read_exact(fd, 8, deadline), "big")
    if size > min(MAX_HEADER_BYTES, max_bytes):
        raise WireError(f"a message header of {size} bytes is over the limit")
    try:
        header = json.loads(_read_exact(fd, size, deadline))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise WireError(f"a message header is not valid JSON ({err})") from None
    lengths = header.get("blobs") if isinstance(header, dict) else None
    if not isinstance(lengths, list) or not all(isinstance(n, int) and n >= 0 for n in lengths):
        raise WireError("a message header does not list its blobs")
    if sum(lengths) + size > max_bytes:
        raise WireError(f"a message of {sum(lengths) + size} bytes is over the {max_bytes}-byte limit")
    return header, [_read_exact(fd, n, deadline) for n in lengths]


# ------------------------------------------------------------------------------------------------ values


class Encoder:
    """Encode one message's values; collects blobs and the tensors it met (in order).

    ``other`` is called for any object the format has no node for: it returns a node (e.g. a ``ref``
    handle on the worker's side) or raises :class:`WireError`.
    """

    def __init__(self, other=None):
        self.blobs: list[bytes] = []
        self.tensors: list[torch.Tensor] = []
        self._other = other

    def encode(self, value, depth: int = 0):
        if depth > MAX_DEPTH:
            raise WireError(f"values nested deeper than {MAX_DEPTH} levels cannot be sent")
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value if abs(value) < 2**53 else {"t": "int", "v": str(value)}
        if isinstance(value, float):
            return value if math.isfinite(value) else {"t": "float", "v": repr(value)}
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in _NUMPY_KINDS:
                raise WireError(f"a NumPy array of dtype {value.dtype} cannot be sent")
            array = np.ascontiguousarray(value)
            self.blobs.append(array.tobytes())
            return {"t": "ndarray", "dtype": array.dtype.str, "shape": list(array.shape), "b": len(self.blobs) - 1}
        if isinstance(value, np.generic):
            return self.encode(value.item(), depth)
        if isinstance(value, (bytes, bytearray)):
            self.blobs.append(bytes(value))
            return {"t": "bytes", "b": len(self.blobs) - 1}
        if isinstance(value, complex):
            return {"t": "complex", "re": self.encode(value.real), "im": self.encode(value.imag)}
        if isinstance(value, torch.dtype):
            return {"t": "dtype", "v": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"t": "device", "v": str(value)}
        if isinstance(value, torch.Size):
            return {"t": "size", "v": list(value)}
        if isinstance(value, slice):
            return {"t": "slice", "v": [self.encode(p, depth + 1) for p in (value.start, value.stop, value.step)]}
        if value is Ellipsis:
            return {"t": "ellipsis"}
        if _library_record(type(value)):
            fields = (
                {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
                if dataclasses.is_dataclass(value)
                else value._asdict()
            )
            return {
                "t": "obj",
                "cls": f"{type(value).__module__}:{type(value).__qualname__}",
                "f": {k: self.encode(v, depth + 1) for k, v in fields.items()},
            }
        if type(value) in (list, tuple, set, frozenset):
            tag = type(value).__name__
            return {"t": tag, "v": [self.encode(v, depth + 1) for v in value]}
        if type(value) is dict:
            return {
                "t": "dict",
                "k": [self.encode(k, depth + 1) for k in value],
                "v": [self.encode(v, depth + 1) for v in value.values()],
            }
        if self._other is not None:
            return self._other(value)
        raise WireError(f"a {type(value).__qualname__} cannot be sent to or from the sandbox")

    def _tensor(self, t: torch.Tensor) -> dict:
        name = str(t.dtype).removeprefix("torch.")
        if name not in _TORCH_DTYPES or t.layout != torch.strided or t.is_quantized:
            raise WireError(f"a {t.dtype} {t.layout} tensor cannot be sent")
        data = t.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8) if data.numel() and data.dtype != torch.bool else data
        self.blobs.append(raw.numpy().tobytes() if data.numel() else b"")
        self.tensors.append(t)
        return {
            "t": "tensor",
            "dtype": name,
            "shape": list(t.shape),
            "b": len(self.blobs) - 1,
            "rg": bool(t.requires_grad),
            "param": isinstance(t, torch.nn.Parameter),
            "dev": t.device.type,
            "i": len(self.tensors) - 1,
        }


def _library_record(cls: type) -> bool:
    """A dataclass or named tuple defined in the quantcourse library (the only classes sent by value)."""
    if not cls.__module__.startswith("quantcourse.") and cls.__module__ != "quantcourse":
        return False
    return (dataclasses.is_dataclass(cls) and isinstance(cls, type)) or (
        issubclass(cls, tuple) and hasattr(cls, "_fields")
    )


class Decoder:
    """Decode one message's values from untrusted input, checking every node.

    ``ref`` is called with the integer of each ``ref`` node; ``device`` is where tensors are created.
    """

    def __init__(self, blobs: list[bytes], *, ref=None, device: torch.device | None = None):
        self.blobs = blobs
        self.tensors: list[torch.Tensor] = []
        self._ref = ref
        self._nodes = 0
        self._device = device

    def decode(self, node, depth: int = 0):
        self._nodes += 1
        if self._nodes > MAX_NODES or depth > MAX_DEPTH:
            raise WireError("a value with too many parts or nested too deeply")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            raise WireError("an untagged list in a message")
        if not isinstance(node, dict) or not isinstance(node.get("t"), str):
            raise WireError("a malformed value in a message")
        tag = node["t"]
        if tag in ("list", "tuple", "set", "frozenset"):
            items = [self.decode(v, depth + 1) for v in self._list(node, "v")]
            return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
        if tag == "dict":
            keys, values = self._list(node, "k"), self._list(node, "v")
            if len(keys) != len(values):
                raise WireError("a dict with as many keys as values is expected")
            return {self.decode(k, depth + 1): self.decode(v, depth + 1) for k, v in zip(keys, values, strict=False)}
        if tag == "tensor":
            return self._tensor(node)
        if tag == "ndarray":
            dtype = np.dtype(self._str(node, "dtype"))
            if dtype.kind not in _NUMPY_KINDS:
                raise WireError(f"NumPy dtype {dtype} is not accepted")
            shape = self._shape(node)
            blob = self._blob(node, math.prod(shape) * dtype.itemsize)
            return np.frombuffer(blob, dtype=dtype).reshape(shape).copy()
        if tag == "bytes":
            return bytes(self._blob(node, None))
        if tag == "int":
            text = self._str(node, "v")
            if len(text) > 5000:
                raise WireError("an integer with too many digits")
            return int(text)
        if tag == "float":
            text = self._str(node, "v")
            if text not in ("inf", "-inf", "nan"):
                raise WireError("a malformed float")
            return float(text)
        if tag == "complex":
            return complex(float(self.decode(node.get("re"), depth + 1)), float(self.decode(node.get("im"), depth + 1)))
        if tag == "dtype":
            return self._dtype(node)
        if tag == "device":
            return torch.device(self._str(node, "v"))
        if tag == "size":
            return torch.Size(self._shape({"shape": node.get("v")}))
        if tag == "slice":
            parts = [self.decode(v, depth + 1) for v in self._list(node, "v")]
            if len(parts) != 3 or not all(p is None or isinstance(p, int) for p in parts):
                raise WireError("a malformed slice")
            return slice(*parts)
        if tag == "ellipsis":
            return Ellipsis
        if tag == "obj":
            return self._record(node, depth)
        if tag == "ref" and self._ref is not None:
            ident = node.get("id")
            if not isinstance(ident, int):
                raise WireError("a malformed reference")
            return self._ref(ident, node)
        raise WireError(f"a value of kind {tag!r} is not accepted")

    # -- checked pieces

    def _list(self, node, key) -> list:
        value = node.get(key)
        if not isinstance(value, list):
            raise WireError(f"a malformed {node['t']}")
        return value

    def _str(self, node, key) -> str:
        value = node.get(key)
        if not isinstance(value, str):
            raise WireError(f"a malformed {node['t']}")
        return value

    def _shape(self, node) -> list[int]:
        shape = node.get("shape")
        if not isinstance(shape, list) or len(shape) > 32 or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise WireError("a malformed shape")
        return shape

    def _blob(self, node, expected: int | None) -> bytes:
        index = node.get("b")
        if not isinstance(index, int) or not 0 <= index < len(self.blobs):
            raise WireError("a value points at a blob that is not in the message")
        blob = self.blobs[index]
        if expected is not None and len(blob) != expected:
            raise WireError(f"a value of {expected} bytes came with {len(blob)} bytes of data")
        return blob

    def _dtype(self, node) -> torch.dtype:
        name = node.get("dtype", node.get("v"))
        if name not in _TORCH_DTYPES:
            raise WireError(f"tensor dtype {name!r} is not accepted")
        return _TORCH_DTYPES[name]

    def _tensor(self, node) -> torch.Tensor:
        dtype, shape = self._dtype(node), self._shape(node)
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        blob = self._blob(node, numel * itemsize)
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            t = flat.view(dtype).reshape(shape) if dtype != torch.bool else flat.view(torch.bool).reshape(shape)
        device = self._device or (_CUDA if node.get("dev") == "cuda" else None)
        if device is not None and device.type != "cpu":
            t = t.to(device)  # a CUDA tensor stays one when this side has a GPU
        if node.get("param") is True:
            t = torch.nn.Parameter(t, requires_grad=bool(node.get("rg")))
        elif node.get("rg") is True and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        self.tensors.append(t)
        return t

    def _record(self, node, depth: int):
        cls_name = self._str(node, "cls")
        module_name, _, qualname = cls_name.partition(":")
        if not (module_name == "quantcourse" or module_name.startswith("quantcourse.")) or "." in qualname:
            raise WireError(f"class {cls_name!r} is not accepted")
        try:
            cls = getattr(importlib.import_module(module_name), qualname)
        except (ImportError, AttributeError):
            raise WireError(f"class {cls_name!r} is not accepted") from None
        if not isinstance(cls, type) or not _library_record(cls):
            raise WireError(f"class {cls_name!r} is not accepted")
        fields = node.get("f")
        if not isinstance(fields, dict):
            raise WireError("a malformed record")
        values = {str(k): self.decode(v, depth + 1) for k, v in fields.items()}
        try:
            return cls(**values)
        except Exception as err:  # noqa: BLE001 - wrong fields from the other side are a wire error
            raise WireError(f"could not build a {qualname} from its fields ({type(err).__name__})") from None
