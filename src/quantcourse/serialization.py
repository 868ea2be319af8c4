"""Save and load a weight-quantized model with safetensors: packed codes, scales, zero points, g_idx.

Chapter 6 (GPTQ) uses it to report how many bytes a quantized model really takes on disk.

One ``.safetensors`` file holds, for every quantized linear layer ``name``::

    name.qweight     uint8  [out, ceil(in * n_bits / 8)]       codes, packed (quantcourse.packing)
    name.scale       float32 [out, n_groups]
    name.zero_point  uint8  [out, ceil(n_groups * n_bits / 8)]  zero points, packed like the codes
    name.g_idx       int32  [in]   only when groups are not consecutive (act-order, dynamic groups)
    name.codebook    float32 [2**n_bits]  only for a non-uniform format (NF4, FP4): the value of each code

plus every other tensor of the model (embeddings, norms, biases) as it is, once (tied weights are
stored once and re-tied on load), and a JSON description of the layers in the file's metadata.
Scales stay float32 so that a reload gives bit-identical dequantized weights; storing them in
float16, as most formats do, would save 2 bytes per group.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import surgery
from .packing import pack_codes, unpack_codes
from .weights import QuantizedModel, QuantizedWeight, consecutive_g_idx, dequantize_codes

__all__ = ["SaveReport", "save_quantized", "load_quantized"]

_FORMAT = "quantcourse-weight-only-v1"
_LAYER_PARTS = ("qweight", "scale", "zero_point", "g_idx", "codebook")


@dataclass(frozen=True)
class SaveReport:
    """What :func:`save_quantized` wrote.

    Attributes:
        path: the file.
        file_bytes: its size on disk.
        quantized_bytes: bytes of the quantized layers (packed codes, scales, zero points, g_idx).
        float_bytes: bytes of the tensors kept in float (embeddings, norms, biases).
        n_quantized_weights: how many weights the quantized layers hold.
    """

    path: Path
    file_bytes: int
    quantized_bytes: int
    float_bytes: int
    n_quantized_weights: int

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight, parameters included (e.g. ~4.56 for 4-bit, groups of 64)."""
        return 8 * self.quantized_bytes / self.n_quantized_weights


def _layer_tensors(name: str, r: QuantizedWeight) -> dict[str, torch.Tensor]:
    tensors = {
        f"{name}.qweight": pack_codes(r.codes, r.n_bits),
        f"{name}.scale": r.scale.float(),
        f"{name}.zero_point": pack_codes(r.zero_point, r.n_bits),
    }
    if not r.has_consecutive_groups:
        tensors[f"{name}.g_idx"] = r.g_idx.to(torch.int32)
    if r.codebook is not None:
        tensors[f"{name}.codebook"] = r.codebook.float().clone()  # one codebook object may serve many layers
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_quantized(qmodel: QuantizedModel, path: str | os.PathLike) -> SaveReport:
    """Write ``qmodel`` to one safetensors file and report the bytes actually saved.

    Args:
        qmodel: a :class:`~quantcourse.weights.QuantizedModel`, from :func:`quantcourse.gptq.quantize_model`
            or any other weight-only method.
        path: the ``.safetensors`` file to write.
    """
    path = Path(path)
    quantized, layers_meta = {}, {}
    for name, r in qmodel.layers.items():
        tensors = _layer_tensors(name, r)
        quantized.update(tensors)
        layers_meta[name] = dict(
            shape=list(r.codes.shape),
            n_bits=r.n_bits,
            group_size=r.group_size,
            symmetric=r.symmetric,
            dtype=str(r.weight.dtype).removeprefix("torch."),
        )
    skip = {f"{name}.weight" for name in qmodel.layers}
    floats, aliases, seen = {}, {}, {}
    for key, tensor in qmodel.model.state_dict().items():
        if key in skip:
            continue
        ptr = (tensor.data_ptr(), tuple(tensor.shape))
        if ptr in seen:  # a tied weight (SmolLM2's lm_head is its embedding): store it once
            aliases[key] = seen[ptr]
            continue
        seen[ptr] = key
        floats[key] = tensor.detach().cpu().contiguous()
    metadata = {
        "format": _FORMAT,
        "config": json.dumps(qmodel.config),
        "layers": json.dumps(layers_meta),
        "aliases": json.dumps(aliases),
    }
    save_file({**quantized, **floats}, str(path), metadata=metadata)
    n_weights = sum(r.codes.numel() for r in qmodel.layers.values())
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts.values())  # noqa: E731
    return SaveReport(path, path.stat().st_size, nbytes(quantized), nbytes(floats), n_weights)


def load_quantized(path: str | os.PathLike, model: nn.Module) -> QuantizedModel:
    """Load a file written by :func:`save_quantized` into ``model`` (same architecture), in place.

    The quantized linears get their dequantized weights, everything else its saved values.

    Args:
        path: the ``.safetensors`` file.
        model: a model of the same architecture, e.g. a fresh ``load_model()``.

    Returns:
        :class:`~quantcourse.weights.QuantizedModel` with the codes and parameters read back (``perm`` and
        ``loss`` are not stored, so they are ``None``).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(
            f"{path} was not written by quantcourse.serialization.save_quantized "
            f"(format {metadata.get('format')!r}, expected {_FORMAT!r})"
        )
    tensors = load_file(str(path))
    model = surgery.as_plain_linears(model)
    layers = {}
    for name, meta in json.loads(metadata["layers"]).items():
        layers[name] = _read_layer(tensors, name, meta)
        linear = surgery.get_module(model, name)
        if tuple(linear.weight.shape) != tuple(meta["shape"]):
            raise ValueError(
                f"{name} is {tuple(linear.weight.shape)} in the model but {tuple(meta['shape'])} "
                "in the file: load into a model of the same architecture"
            )
        linear.weight = nn.Parameter(layers[name].weight, requires_grad=False)
    quantized_keys = {f"{name}.{part}" for name in layers for part in _LAYER_PARTS}
    floats = {k: v for k, v in tensors.items() if k not in quantized_keys}
    floats.update({key: floats[kept] for key, kept in json.loads(metadata["aliases"]).items()})
    model.load_state_dict(floats, strict=False)
    return QuantizedModel(model, layers, json.loads(metadata["config"]))


def _read_layer(tensors: dict[str, torch.Tensor], name: str, meta: dict) -> QuantizedWeight:
    out_f, in_f = meta["shape"]
    n_bits, group_size = meta["n_bits"], meta["group_size"]
    scale = tensors[f"{name}.scale"]
    codes = unpack_codes(tensors[f"{name}.qweight"], n_bits, in_f)
    zero_point = unpack_codes(tensors[f"{name}.zero_point"], n_bits, scale.shape[1]).to(torch.int32)
    g_idx = tensors.get(f"{name}.g_idx")
    g_idx = consecutive_g_idx(in_f, group_size) if g_idx is None else g_idx.long()
    codebook = tensors.get(f"{name}.codebook")
    weight = dequantize_codes(codes, scale, zero_point, g_idx, getattr(torch, meta["dtype"]), codebook=codebook)
    return QuantizedWeight(
        weight, codes, scale, zero_point, n_bits, group_size, meta["symmetric"], g_idx=g_idx, codebook=codebook
    )
