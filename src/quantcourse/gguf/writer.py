"""Export a transformers Llama-family model to a quantized ``.gguf`` file, and read one back.

Chapter 11 (GGUF). Built on gguf-py's ``GGUFWriter``: the tensors get llama.cpp's names
(``blk.N.attn_q.weight`` ...), the query/key matrices are permuted exactly as llama.cpp's
``convert_hf_to_gguf.py`` does (both in :mod:`.names`), every tensor is quantized to the type
:mod:`.mixtures` assigns, and the tokenizer (byte-level BPE) and hyperparameters go into the metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from ..progress import progress_bar
from .api import dequantize, quantize
from .base import get_format
from .mixtures import MIXTURES, TensorChoice, plan_mixture
from .names import from_gguf_layout, gguf_name, to_gguf_layout

__all__ = [
    "ExportResult",
    "export_gguf",
    "gguf_state_dict",
    "load_gguf_weights",
    "dequantized_model",
]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_gguf` wrote.

    Attributes:
        path: the ``.gguf`` file.
        mixture: e.g. ``"Q4_K_M"``.
        choices: GGUF tensor name -> :class:`~quantcourse.gguf.mixtures.TensorChoice`.
        n_bytes: size of the file.
        n_weights: number of weights (all tensors).
        tensor_bytes: bytes of tensor data (weights and their scales).
    """

    path: str
    mixture: str
    choices: dict[str, TensorChoice]
    n_bytes: int
    n_weights: int
    tensor_bytes: int

    @property
    def bits_per_weight(self) -> float:
        """Tensor data bits per weight, the number llama.cpp prints (``BPW``)."""
        return self.tensor_bytes * 8 / self.n_weights


def gguf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's names, q/k permuted, float32 (a tied ``lm_head`` is left out)."""
    cfg = model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = {}
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = gguf_name(hf_name, cfg.num_hidden_layers)
        out[name] = to_gguf_layout(name, t.detach().to(torch.float32), cfg).contiguous()
    return out


def _tokenizer_metadata(w: gguf.GGUFWriter, tokenizer, n_vocab: int, pre: str) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers are supported, got {model.get('type')!r}")
    vocab = tokenizer.get_vocab()
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for tok, i in vocab.items():
        if i < n_vocab:
            tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < n_vocab:
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, adder in [
        ("bos_token_id", w.add_bos_token_id),
        ("eos_token_id", w.add_eos_token_id),
        ("unk_token_id", w.add_unk_token_id),
        ("pad_token_id", w.add_pad_token_id),
    ]:
        if getattr(tokenizer, key, None) is not None:
            adder(getattr(tokenizer, key))
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)


def _hparams(w: gguf.GGUFWriter, cfg, name: str, file_type) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(
    model: torch.nn.Module,
    tokenizer,
    path: str | os.PathLike,
    mixture: str = "Q4_K_M",
    *,
    tokenizer_pre: str = "default",
    name: str = "quantcourse export",
    imatrix: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> ExportResult:
    """Write ``model`` as a llama.cpp ``.gguf`` file quantized with ``mixture``.

    Args:
        model: a transformers Llama-family causal LM (Llama, SmolLM, ...), float weights. Not modified.
        tokenizer: its (byte-level BPE) tokenizer.
        path: output file.
        mixture: ``"Q4_0"``, ``"Q8_0"``, ``"Q4_K_S"``, ``"Q4_K_M"``, ``"Q5_K_M"`` or ``"Q6_K"``; each
            tensor's type follows llama.cpp's rules (:func:`~quantcourse.gguf.mixtures.plan_mixture`).
        tokenizer_pre: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``; ``"smollm"`` for the course model).
        name: ``general.name``.
        imatrix: optional GGUF name -> importance vector (:func:`~quantcourse.gguf.compute_imatrix`), used
            as ``llama-quantize --imatrix`` uses it: for every tensor stored as Q4_0, Q4_1, Q5_0, Q5_1,
            Q4_K, Q5_K or Q6_K (Q8_0 has no search to weight; the six mixtures use no other type).
        progress: show a tqdm bar over tensors.
    Returns:
        :class:`ExportResult`.
    """
    if mixture not in MIXTURES:
        raise ValueError(f"unknown mixture {mixture!r}; choose one of {sorted(MIXTURES)}")
    cfg = model.config
    tensors = gguf_state_dict(model)
    choices = plan_mixture({k: tuple(v.shape) for k, v in tensors.items()}, mixture, n_layers=cfg.num_hidden_layers)
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    _hparams(w, cfg, name, MIXTURES[mixture][1])
    _tokenizer_metadata(w, tokenizer, cfg.vocab_size, tokenizer_pre)
    tensor_bytes = 0
    for tname, t in progress_bar(tensors.items(), desc=f"export {mixture}", disable=not progress):
        qtype = choices[tname].qtype
        if qtype == "F32":
            data = t.numpy()
            w.add_tensor(tname, data)
        elif qtype == "F16":
            data = t.to(torch.float16).numpy()
            w.add_tensor(tname, data)
        else:
            im = imatrix.get(tname) if imatrix is not None and get_format(qtype).imatrix_sigma else None
            data = quantize(t, qtype, imatrix=im).numpy()
            w.add_tensor(tname, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
        tensor_bytes += data.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    n_weights = sum(t.numel() for t in tensors.values())
    return ExportResult(os.fspath(path), mixture, choices, os.path.getsize(path), n_weights, tensor_bytes)


def load_gguf_weights(path: str | os.PathLike) -> dict[str, tuple[str, torch.Tensor]]:
    """Read a ``.gguf`` file and dequantize every tensor with :func:`~quantcourse.gguf.dequantize`.

    Returns:
        GGUF name -> (type name, float32 tensor in PyTorch's ``[out, in]`` order; q/k still permuted).
    """
    reader = gguf.GGUFReader(os.fspath(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne[0] (the row length) first
        kind = t.tensor_type.name
        if kind in ("F32", "F16"):
            values = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(shape)
        else:
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            values = dequantize(np.asarray(t.data), kind, (rows, shape[-1])).reshape(shape)
        out[t.name] = (kind, values)
    return out


def dequantized_model(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """A copy of ``model`` whose weights are those of the ``.gguf`` file, dequantized (q/k un-permuted).

    This is how chapter 11 measures a mixture's perplexity: the exact weights llama.cpp would use,
    run in PyTorch. ``model`` itself is not modified.
    """
    import copy

    cfg = model.config
    out = copy.deepcopy(model)
    weights = load_gguf_weights(path)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    state = out.state_dict()
    for hf_name in state:
        name = gguf_name(hf_name, cfg.num_hidden_layers)
        if name == "output.weight" and tied and name not in weights:  # a tied lm_head is token_embd
            name = "token_embd.weight"
        if name not in weights:
            raise ValueError(
                f"{os.fspath(path)} has no tensor {name!r} for the model's {hf_name!r}: load a file exported "
                "from a model of the same architecture"
            )
        t = from_gguf_layout(name, weights[name][1], cfg)
        if t.numel() != state[hf_name].numel():
            raise ValueError(
                f"{name} in {os.fspath(path)} has shape {tuple(t.shape)}, the model's {hf_name} "
                f"{tuple(state[hf_name].shape)}: load a file exported from a model of the same architecture"
            )
        state[hf_name].copy_(t.reshape(state[hf_name].shape))
    return out
