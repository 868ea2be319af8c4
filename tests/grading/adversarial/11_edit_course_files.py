# ruff: noqa: E501 - the submissions are code in strings
"""Edit files of the course root: nbgrader_config.py, the gradebook, solutions/ and the installed hidden.py."""

from . import HONEST_FAKE_QUANT, HONEST_SCALE

EARNED = 5.0
ANSWERS = {"absmax_scale": HONEST_SCALE, "fake_quant": HONEST_FAKE_QUANT}
EXTRA = [
    "import sqlite3\n_results = []\n"
    "for _path, _text in [('{CONFIG}', '\\nraise SystemExit(\"owned\")\\n'), ('{HIDDEN_PY}', '\\nforbid = None\\n'),"
    " ('{SOLUTIONS}/f01_toy/f01_toy.ipynb', ''), ('{ROOT}/course/f01_toy/f01_toy.ipynb', '')]:\n"
    "    try:\n        open(_path, 'a').write(_text)\n        _results.append('wrote ' + _path)\n"
    "    except OSError as e:\n        _results.append(type(e).__name__)\n"
    "try:\n    _db = sqlite3.connect('{WORK}/gradebook.db')\n"
    "    _db.execute('update grade set manual_score = 100')\n    _db.commit()\nexcept Exception as e:\n"
    "    _results.append(type(e).__name__)\nprint(_results)\n"
]
