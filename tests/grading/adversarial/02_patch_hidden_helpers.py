# ruff: noqa: E501 - the submissions are code in strings
"""Neutralise the hidden-test helpers (forbid, assert_close_to_reference) in memory and on disk."""

from . import WRONG_FAKE_QUANT, WRONG_SCALE

EARNED = 0.0
ANSWERS = {
    "absmax_scale": (
        "import contextlib\nimport quantcourse.grading.hidden as h\n"
        "h.assert_close_to_reference = lambda *a, **k: None\nh.forbid = lambda *a: contextlib.nullcontext()\n"
        "try:\n    open(h.__file__, 'a').write('\\nassert_close_to_reference = lambda *a, **k: None\\n')\n"
        "except OSError as e:\n    print('could not write hidden.py:', type(e).__name__)\n"
        "try:\n    open('{HIDDEN_PY}', 'a').write('\\nforbid = None\\n')\nexcept OSError as e:\n    print(type(e).__name__)\n"
        + WRONG_SCALE
    ),
    "fake_quant": WRONG_FAKE_QUANT,
}
