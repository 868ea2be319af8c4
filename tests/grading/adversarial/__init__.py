"""Hostile and honest submissions of the toy assignment, one file per case (see ``load_cases``).

Each case module has a docstring (what it tries), ``EARNED`` (the points it deserves out of 5:
``absmax_scale`` is worth 2, ``fake_quant`` 3) and builds its notebook from the toy release with
``ANSWERS`` (grade_id -> source), optional ``EXTRA`` (code cells added after the last cell) and an
optional ``edit(nb)``. Sources may name ``{ROOT}``, ``{SOLUTIONS}``, ``{WORK}``, ``{HIDDEN_PY}``,
``{CONFIG}`` and ``{MARK}`` (a per-run marker): the paths a student who knows the course layout would try.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

HONEST_SCALE = "def absmax_scale(x, n_bits):\n    return x.abs().max() / (2 ** (n_bits - 1) - 1)\n"
HONEST_FAKE_QUANT = (
    "def fake_quant(x, n_bits):\n    qmax = 2 ** (n_bits - 1) - 1\n    scale = x.abs().max() / qmax\n"
    "    return (x / scale).round().clamp(-qmax, qmax) * scale\n"
)
WRONG_SCALE = "def absmax_scale(x, n_bits):\n    return torch.tensor(0.5)\n"
WRONG_FAKE_QUANT = "def fake_quant(x, n_bits):\n    return x * 0\n"


def load_cases() -> dict:
    """Every case module in this folder, by name."""
    folder = Path(__file__).parent
    return {
        info.name: importlib.import_module(f"{__name__}.{info.name}")
        for info in pkgutil.iter_modules([str(folder)])
        if info.name[0].isdigit()
    }
