"""Chapter 11's course-model table: export the course model with each llama.cpp mixture and measure it.

For each mixture: write the ``.gguf`` file with ``quantcourse.gguf.export_gguf``, read its tensors
back and dequantize them into the model (``dequantized_model``), and measure perplexity on the course
text (``seq_len=512, n_windows=4``). Writes ``benchmarks/results/gguf_mixtures.json``, which the
chapter reads (exporting six files takes longer than a chapter may run).

    python benchmarks/gguf_mixtures.py              # all mixtures
    python benchmarks/gguf_mixtures.py Q4_K_M       # one, merged into the existing results
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter

import torch

from quantcourse import data
from quantcourse.evaluate import perplexity
from quantcourse.gguf import MIXTURES, dequantized_model, export_gguf
from quantcourse.models import load_model

BASELINE = "F32 (baseline)"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gguf_mixtures.json")


def _save(rows: list[dict]) -> None:
    meta = {"model": "course model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32)",
            "perplexity": "quantcourse.evaluate.perplexity(seq_len=512, n_windows=4) on data.eval_tokens",
            "torch": torch.__version__}
    with open(OUT, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def main(mixtures: list[str]) -> None:
    """Measure ``mixtures`` (all by default), keeping rows already in the results file."""
    torch.manual_seed(0)
    model, tok = load_model()
    tokens = data.eval_tokens(tok)
    rows = json.load(open(OUT))["rows"] if os.path.exists(OUT) else []
    if not rows or rows[0]["mixture"] != BASELINE:
        n_weights = sum(p.numel() for p in model.parameters())
        rows.insert(0, {"mixture": BASELINE, "ppl": perplexity(model, tokens, seq_len=512, n_windows=4),
                        "bits_per_weight": 32.0, "file_mb": n_weights * 4 / 1e6, "types": {"F32": "all"}})
        _save(rows)
    with tempfile.TemporaryDirectory() as tmp:
        for mixture in mixtures:
            t0 = time.time()
            res = export_gguf(model, tok, os.path.join(tmp, f"{mixture}.gguf"), mixture, tokenizer_pre="smollm", progress=False)
            ppl = perplexity(dequantized_model(model, res.path), tokens, seq_len=512, n_windows=4)
            row = {"mixture": mixture, "ppl": ppl, "bits_per_weight": res.bits_per_weight, "file_mb": res.n_bytes / 1e6,
                   "types": dict(Counter(c.qtype for c in res.choices.values())),
                   "fallbacks": sum(c.fell_back for c in res.choices.values()), "seconds": time.time() - t0}
            rows = [r for r in rows if r["mixture"] != mixture] + [row]
            order = [BASELINE, *MIXTURES]
            rows.sort(key=lambda r: order.index(r["mixture"]))
            _save(rows)
            print(row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(MIXTURES))
