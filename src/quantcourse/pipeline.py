"""The layer-by-layer post-training quantization pipeline: one decoder block at a time.

Chapter 6 teaches it with GPTQ; AWQ, SmoothQuant and the GGUF importance matrix reuse it. It never
names a model family: it finds blocks and linear layers through :mod:`quantcourse.surgery`, so it
runs on Llama-style (Llama, SmolLM2, Mistral, Qwen2), OPT and GPT-2 causal LMs.

::

    capture     run the model on the calibration batches up to the first decoder block and record
                what that block receives: the hidden states [batch, seq, hidden] and the keyword
                arguments (attention mask, position ids, the rotary (cos, sin) position embeddings,
                use_cache=False); a forward pre-hook records them and stops the forward pass
    for each block i, in order (tqdm bar over the blocks):
      collect   run block i on its inputs with hooks on its linear layers:
                collect(name, linear, X [tokens, in]) for every linear and batch; each
                batch's pass stops once the last chosen linear has its input
      transform transform_block(ctx): change the block (smoothing, scaling); it may run the block,
                or collect again, through ctx
      quantize  quantize_linear(name, linear) for each linear of the block, in definition order
      propagate run the processed block on the same inputs: its outputs are block i+1's inputs

Order inside a block: by default every linear layer is quantized from statistics of the block's
**float** inputs gathered in one pass (the reference's default), so each block is run twice: the float
block for the statistics, the quantized one for the outputs. Across blocks the pipeline is
sequential: block i+1 sees the outputs of the already-quantized block i, as in the reference's
``llama_sequential``. Only one block's activations are held at a time (its inputs and its outputs).
A pipeline with neither ``collect`` nor ``transform_block`` (round-to-nearest) needs no data and runs
no forward pass.

``true_sequential=True`` is the reference's ``--true-sequential`` (the default of AutoGPTQ and of
transformers' ``GPTQConfig``): each linear is quantized from inputs that already went through the
quantized layers before it in the block ([q,k,v] → [o] → [gate,up] → [down]). The reference gets there
by re-running the block after each of those four groups; here the block runs **once**, on the whole
calibration set as one batch, and each linear is collected and quantized in a forward pre-hook, just
before it computes its output with the quantized weight::

    for each block i:
      one pass  block(all calibration hidden states): at each linear, in execution order,
                collect(name, linear, X [all tokens, in]) then quantize_linear(name, linear);
                the pass's outputs are block i+1's inputs

One pass per block instead of two, and bigger matrix products; the price is memory: the block's
activations for every calibration token at once (for the course model at 128 x 512 tokens the
largest, the MLP's [65536, 1536] float32 input of ``down_proj``, is 0.4 GB).

``forward_dtype=torch.bfloat16`` runs the blocks' calibration passes under ``torch.autocast``: the
matrix products and attention compute in bfloat16, while the residual stream, the norms, the model's
weights and every callback (Hessians, the GPTQ solve) stay in float32. The reference does the same
with float16 on a GPU (it loads the model in half precision and casts each layer's input to float32
for the Hessian). On a CPU with bfloat16 instructions (AVX-512 BF16, AMX) a block's pass is about
twice as fast; elsewhere autocast may be slower than float32. bfloat16 rounds to 8 bits of mantissa
(float16: 11), and the statistics it gives are measurably worse for GPTQ (see
:func:`quantcourse.gptq.quantize_model`), so it is an option, never the default.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import surgery
from .progress import progress_bar

__all__ = [
    "FORWARD_DTYPES",
    "check_forward_dtype",
    "BlockContext",
    "capture_block_inputs",
    "check_calibration",
    "run_blockwise",
    "LinearInputFn",
    "QuantizeLinearFn",
]

LinearInputFn = Callable[[str, nn.Linear, torch.Tensor], None]  # (name, linear, X [tokens, in])
QuantizeLinearFn = Callable[[str, nn.Linear], None]  # (name, linear): replace linear.weight, in place


FORWARD_DTYPES = (torch.bfloat16, torch.float16)  # what torch.autocast computes in, on CPU and GPU


def check_forward_dtype(forward_dtype: torch.dtype | None) -> None:
    """Raise ``ValueError`` unless ``forward_dtype`` is ``None`` or one of :data:`FORWARD_DTYPES`."""
    if forward_dtype is not None and forward_dtype not in FORWARD_DTYPES:
        raise ValueError(
            "forward_dtype must be None (the model's own dtype), torch.bfloat16 or torch.float16, "
            f"got {forward_dtype!r}"
        )


class _StopForward(Exception):
    """Raised by a hook once what a forward pass was run for is recorded (the rest is not computed)."""


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass(frozen=True)
class BlockContext:
    """One decoder block and the calibration inputs it sees, handed to ``transform_block``.

    Attributes:
        index: position of the block (0 = first).
        name: qualified name of the block in the model, e.g. ``"model.layers.3"``.
        block: the module itself (modify it in place).
        inputs: hidden-state batches ``[batch, seq, hidden]``: what the block receives.
        args: per batch, the positional arguments after the hidden states.
        kwargs: per batch, the keyword arguments (attention mask, position embeddings, ...).
        forward_dtype: ``None``, or the lower precision :meth:`run` and :meth:`collect` compute the
            block in (``torch.autocast``; see the module docstring). Callbacks always run in full precision.
    """

    index: int
    name: str
    block: nn.Module
    inputs: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    forward_dtype: torch.dtype | None = None

    def _device_type(self) -> str:
        return self.inputs[0].device.type if self.inputs else "cpu"

    def forward_precision(self) -> contextlib.AbstractContextManager:
        """The context the block's passes run in: ``torch.autocast`` to ``forward_dtype``, or nothing."""
        if self.forward_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device_type(), dtype=self.forward_dtype)

    def full_precision(self) -> contextlib.AbstractContextManager:
        """The context a callback runs in from inside a pass: autocast switched off (a Hessian's products
        and the GPTQ solve must not drop to ``forward_dtype``)."""
        if self.forward_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device_type(), enabled=False)

    def linears(self, names: Callable[[str], bool] = lambda name: True) -> dict[str, nn.Linear]:
        """The block's linear layers by qualified name, in definition order; only those ``names`` accepts."""
        found = surgery.find_linears(self.block, prefix=f"{self.name}.")
        return {name: linear for name, linear in found.items() if names(name)}

    @torch.no_grad()
    def run(self, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The block's outputs on ``inputs`` (default: its calibration inputs), one tensor per batch."""
        inputs = self.inputs if inputs is None else inputs
        with self.forward_precision():
            return [
                _block_output(self.block(x, *a, **k)) for x, a, k in zip(inputs, self.args, self.kwargs, strict=True)
            ]

    @torch.no_grad()
    def collect(self, fn: LinearInputFn, *, names: Callable[[str], bool] = lambda name: True) -> None:
        """Run the block on its inputs and call ``fn(name, linear, X)`` with each linear's input.

        ``X`` is ``[tokens, in]`` (batch and sequence flattened), one call per linear and batch, in
        execution order. Linears fed the same tensor (q/k/v, gate/up) receive the very same ``X``
        object, so a collector can do shared work once (``X is previous_X``).

        Each batch's forward pass stops as soon as every chosen linear has received its input (a hook
        raises an exception that this method catches): nothing after it is computed, since only the
        inputs are wanted. For the whole block that skips the last linear (``down_proj``) and what
        follows it; for one early layer, most of the block. (A linear called more than once per pass
        would miss its calls after that point; no supported block does this.)
        """
        linears = self.linears(names)
        if not linears:
            return
        seen: set[str] = set()

        def on_input(name: str, linear: nn.Linear, X: torch.Tensor) -> None:
            with self.full_precision():
                fn(name, linear, X)
            seen.add(name)
            if len(seen) == len(linears):
                raise _StopForward

        with surgery.record_inputs(linears, on_input), self.forward_precision():
            for x, a, k in zip(self.inputs, self.args, self.kwargs, strict=True):
                seen.clear()
                with contextlib.suppress(_StopForward):
                    self.block(x, *a, **k)


def check_calibration(calibration: torch.Tensor, batch_size: int) -> None:
    """Raise ``ValueError`` unless ``calibration`` is int64 token ids ``[n_samples, seq_len]``, ``batch_size`` > 0."""
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.is_floating_point():
        raise ValueError(
            "calibration must be an int64 tensor of token ids [n_samples, seq_len], e.g. "
            "quantcourse.data.calibration_samples(tokenizer, 32, 512); got "
            f"{getattr(calibration, 'shape', type(calibration).__name__)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 8
) -> tuple[list[torch.Tensor], list[tuple], list[dict]]:
    """What the first decoder block receives on each calibration batch.

    Args:
        model: a causal LM (see the module docstring).
        calibration: int64 ``[n_samples, seq_len]`` token ids.
        batch_size: sequences per forward pass.

    Returns:
        ``(inputs, args, kwargs)``: per batch, the hidden states ``[batch, seq, hidden]``, the other
        positional arguments and the keyword arguments of the block's ``forward``.
    """
    check_calibration(calibration, batch_size)
    first = surgery.decoder_blocks(model)[0]
    device = next(model.parameters()).device
    inputs, args, kwargs = [], [], []

    def record(module: nn.Module, a: tuple, k: dict) -> None:
        k = dict(k)
        inputs.append(a[0] if a else k.pop("hidden_states"))
        args.append(tuple(a[1:]))
        kwargs.append(k)
        raise _StopForward

    handle = first.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return inputs, args, kwargs


def _qualified_names(model: nn.Module, blocks: nn.ModuleList) -> list[str]:
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(block)] for block in blocks]


@torch.no_grad()
def run_blockwise(
    model: nn.Module,
    calibration: torch.Tensor | None,
    *,
    collect: LinearInputFn | None = None,
    transform_block: Callable[[BlockContext], None] | None = None,
    quantize_linear: QuantizeLinearFn | None = None,
    linear_filter: Callable[[str], bool] = lambda name: True,
    batch_size: int = 8,
    true_sequential: bool = False,
    forward_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "blocks",
) -> None:
    """Process the decoder blocks of ``model`` in order, each on the outputs of the processed blocks before it.

    Per block: ``collect`` statistics of each linear's inputs (one pass of the float block), then
    ``transform_block(ctx)``, then ``quantize_linear(name, linear)`` for every selected linear, then the
    block's new outputs become the next block's inputs. GPT-2's ``Conv1D`` layers are turned into
    ``nn.Linear`` first (:func:`quantcourse.surgery.as_plain_linears`), so callbacks always see ``[out, in]``,
    and the model is put in eval mode.

    Args:
        model: a Llama-, OPT- or GPT-2-style causal LM; modified in place by the callbacks.
        calibration: int64 ``[n_samples, seq_len]`` token ids; may be ``None`` when neither ``collect``
            nor ``transform_block`` is given (nothing then needs data).
        collect: ``collect(name, linear, X [tokens, in])``, called for each linear and batch.
        transform_block: ``transform_block(ctx: BlockContext)``, after ``collect``.
        quantize_linear: ``quantize_linear(name, linear)``, after ``transform_block``.
        linear_filter: which linears (by qualified name) ``collect`` and ``quantize_linear`` see.
        batch_size: calibration sequences per forward pass (with ``true_sequential``, every sequence
            goes in one pass: see the module docstring).
        true_sequential: quantize each linear from the outputs of the already-quantized linears before
            it in the block, in one pass per block (needs ``collect`` and ``quantize_linear``, and no
            ``transform_block``).
        forward_dtype: ``None`` (the model's dtype), or ``torch.bfloat16`` / ``torch.float16``: run the
            blocks' calibration passes under ``torch.autocast`` in that precision; every callback still
            runs in full precision (see the module docstring).
        progress: show a tqdm bar over the blocks.
        desc: the bar's label.
    """
    if true_sequential and (collect is None or quantize_linear is None or transform_block is not None):
        raise ValueError(
            "true_sequential=True quantizes each linear inside the block's forward pass, so it needs collect "
            "and quantize_linear, and no transform_block (a transform changes the block before any linear is "
            "quantized: run it with true_sequential=False)"
        )
    check_forward_dtype(forward_dtype)
    model = surgery.as_plain_linears(model).eval()  # calibration never runs dropout
    blocks = surgery.decoder_blocks(model)
    names = _qualified_names(model, blocks)
    needs_data = collect is not None or transform_block is not None
    if needs_data:
        if calibration is None:
            raise ValueError(
                "this pipeline collects statistics or transforms blocks, so it needs calibration "
                "token ids [n_samples, seq_len]; only round-to-nearest can run without"
            )
        if true_sequential:
            check_calibration(calibration, batch_size)
            batch_size = calibration.shape[0]  # one batch: every linear must see all tokens before it computes
        inputs, args, kwargs = capture_block_inputs(model, calibration, batch_size=batch_size)
    else:
        inputs, args, kwargs = [], [], []
    if true_sequential:
        on_cpu = all(x.device.type == "cpu" for x in inputs)
        with _large_allocations_reused() if on_cpu else contextlib.nullcontext():
            for index in progress_bar(range(len(blocks)), desc=desc, disable=not progress):
                ctx = BlockContext(index, names[index], blocks[index], inputs, args, kwargs, forward_dtype)
                inputs = _run_quantizing(ctx, collect, quantize_linear, linear_filter)
        return
    for index in progress_bar(range(len(blocks)), desc=desc, disable=not progress):
        ctx = BlockContext(index, names[index], blocks[index], inputs, args, kwargs, forward_dtype)
        if collect is not None:
            ctx.collect(collect, names=linear_filter)
        if transform_block is not None:
            transform_block(ctx)
        if quantize_linear is not None:
            for name, linear in ctx.linears(linear_filter).items():
                quantize_linear(name, linear)
        if needs_data and index + 1 < len(blocks):
            inputs = ctx.run()  # the processed block's outputs feed the next block


def _run_quantizing(
    ctx: BlockContext, collect: LinearInputFn, quantize_linear: QuantizeLinearFn, names: Callable[[str], bool]
) -> list[torch.Tensor]:
    """One pass of ``ctx.block`` that collects and quantizes each chosen linear just before it computes.

    A forward pre-hook runs before the linear reads its weight, so the quantized weight set by
    ``quantize_linear`` is the one this very call multiplies with: everything after it in the block sees
    the quantized layer's output. Returns the block's outputs (the next block's inputs).
    """
    linears = ctx.linears(names)
    done: set[str] = set()

    def on_input(name: str, linear: nn.Linear, X: torch.Tensor) -> None:
        if name in done:
            raise RuntimeError(f"{name} is called twice in one pass of its block; use true_sequential=False")
        with ctx.full_precision():
            collect(name, linear, X)
            quantize_linear(name, linear)
        done.add(name)

    with surgery.record_inputs(linears, on_input):
        outputs = ctx.run()
    missing = [name for name in linears if name not in done]
    if missing:
        raise RuntimeError(f"true_sequential: {', '.join(missing)} never ran in the forward pass of {ctx.name}")
    return outputs


# glibc's mallopt parameters (malloc.h) and the defaults they are put back to
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has ``mallopt`` and ``malloc_trim``), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def _large_allocations_reused() -> Iterator[None]:
    """While the block runs, let glibc serve large CPU tensors from its heap and keep freed ones there.

    Why: with ``true_sequential`` a block runs on every calibration token at once, so each linear's
    output is hundreds of MB ([65536, 1536] float32 is 0.4 GB on the course model). glibc gives every
    allocation above its mmap threshold (32 MiB at most) to ``mmap`` and returns it on free, so the
    kernel zero-fills fresh pages for every activation of every block. With mmap off (``M_MMAP_MAX=0``)
    and the heap kept (``M_TRIM_THRESHOLD``), freed activations are reused by the next ones: one block's
    forward pass at 128 x 512 tokens went from 4.5 s to 3.3 s on the 2-core machine. Afterwards glibc's
    default limits are set again and the heap is trimmed (``malloc_trim``), so the memory goes back to
    the system. Not glibc (macOS, musl, Windows): nothing changes.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
