"""Chapter 11's course-model table: export the course model with each llama.cpp mixture and measure it.

For each mixture: write the ``.gguf`` file with ``quantcourse.gguf.export_gguf``, read its tensors
back and dequantize them into the model (``dequantized_model``), and measure perplexity on the course
text (``seq_len=512, n_windows=4``). Writes ``benchmarks/results/gguf_mixtures.json``, which the
chapter reads (exporting six files takes longer than a chapter may run).

    python benchmarks/gguf_mixtures.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter

import torch

from quantcourse import data
from quantcourse.evaluate import perplexity
from quantcourse.gguf import MIXTURES, dequantized_model, export_gguf
from quantcourse.models import load_model

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gguf_mixtures.json")


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model()
    tokens = data.eval_tokens(tok)
    rows = [{"mixture": "F32 (baseline)", "ppl": perplexity(model, tokens, seq_len=512, n_windows=4),
             "bits_per_weight": 32.0, "file_mb": None, "types": {"F32": "all"}}]
    n_weights = sum(p.numel() for p in model.parameters())
    rows[0]["file_mb"] = n_weights * 4 / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        for mixture in MIXTURES:
            t0 = time.time()
            res = export_gguf(model, tok, os.path.join(tmp, f"{mixture}.gguf"), mixture, tokenizer_pre="smollm", progress=False)
            ppl = perplexity(dequantized_model(model, res.path), tokens, seq_len=512, n_windows=4)
            types = Counter(c.qtype for c in res.choices.values())
            fallbacks = sum(c.fell_back for c in res.choices.values())
            rows.append({"mixture": mixture, "ppl": ppl, "bits_per_weight": res.bits_per_weight,
                         "file_mb": res.n_bytes / 1e6, "types": dict(types), "fallbacks": fallbacks,
                         "seconds": time.time() - t0})
            print(rows[-1], flush=True)
    meta = {"model": "course model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32)",
            "perplexity": "quantcourse.evaluate.perplexity(seq_len=512, n_windows=4) on data.eval_tokens",
            "torch": torch.__version__}
    with open(OUT, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
