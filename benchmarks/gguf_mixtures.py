"""Chapter 11's course-model table: export the course model with each llama.cpp mixture and measure it.

For each mixture: write the ``.gguf`` file with ``quantcourse.gguf.export_gguf``, read its tensors
back and dequantize them into the model (``dequantized_model``), and measure perplexity on the course
text (``seq_len=512, n_windows=4``). Writes ``benchmarks/results/gguf_mixtures.json``, which the
chapter reads (exporting nine files takes longer than a chapter may run). A name ending in
``+imatrix`` exports with an importance matrix computed from the calibration part of the course
text (``IMATRIX_SAMPLES`` sequences of 512 tokens, disjoint from the evaluation text), as
``llama-imatrix`` followed by ``llama-quantize --imatrix`` would.

    python benchmarks/gguf_mixtures.py                      # all mixtures, with and without imatrix
    python benchmarks/gguf_mixtures.py Q4_K_M Q4_K_M+imatrix  # some, merged into the existing results
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from quantcourse import data
from quantcourse.evaluate import perplexity
from quantcourse.gguf import MIXTURES, compute_imatrix, dequantized_model, export_gguf
from quantcourse.models import load_model

BASELINE = "F32 (baseline)"
IMATRIX = "+imatrix"
IMATRIX_SAMPLES = 32
WITH_IMATRIX = ["Q4_0", "Q4_K_S", "Q4_K_M"]  # the 4-bit mixtures, where the imatrix matters most
ORDER = [BASELINE] + [m + s for m in MIXTURES for s in ("", IMATRIX) if not s or m in WITH_IMATRIX]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gguf_mixtures.json")


def _save(rows: list[dict]) -> None:
    meta = {
        "model": "course model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32)",
        "perplexity": "quantcourse.evaluate.perplexity(seq_len=512, n_windows=4) on data.eval_tokens",
        "imatrix": f"compute_imatrix on data.calibration_samples(tok, {IMATRIX_SAMPLES}, 512, seed=0)",
        "torch": torch.__version__,
    }
    with open(OUT, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def main(mixtures: list[str]) -> None:
    """Measure ``mixtures`` (all by default), keeping rows already in the results file."""
    torch.manual_seed(0)
    model, tok = load_model()
    tokens = data.eval_tokens(tok)
    rows = json.loads(Path(OUT).read_text())["rows"] if os.path.exists(OUT) else []
    if not rows or rows[0]["mixture"] != BASELINE:
        n_weights = sum(p.numel() for p in model.parameters())
        rows.insert(
            0,
            {
                "mixture": BASELINE,
                "ppl": perplexity(model, tokens, seq_len=512, n_windows=4),
                "bits_per_weight": 32.0,
                "file_mb": n_weights * 4 / 1e6,
                "types": {"F32": "all"},
            },
        )
        _save(rows)
    imatrix = None
    if any(m.endswith(IMATRIX) for m in mixtures):
        imatrix = compute_imatrix(model, data.calibration_samples(tok, IMATRIX_SAMPLES, 512, seed=0), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        for name in mixtures:
            t0 = time.time()
            mixture = name.removesuffix(IMATRIX)
            res = export_gguf(
                model,
                tok,
                os.path.join(tmp, "model.gguf"),
                mixture,
                tokenizer_pre="smollm",
                imatrix=imatrix if name.endswith(IMATRIX) else None,
                progress=False,
            )
            ppl = perplexity(dequantized_model(model, res.path), tokens, seq_len=512, n_windows=4)
            row = {
                "mixture": name,
                "ppl": ppl,
                "bits_per_weight": res.bits_per_weight,
                "file_mb": res.n_bytes / 1e6,
                "types": dict(Counter(c.qtype for c in res.choices.values())),
                "fallbacks": sum(c.fell_back for c in res.choices.values()),
                "seconds": time.time() - t0,
            }
            rows = [r for r in rows if r["mixture"] != name] + [row]
            rows.sort(key=lambda r: ORDER.index(r["mixture"]))
            _save(rows)
            print(row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ORDER[1:])
