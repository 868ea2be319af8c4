"""Copies are seen: renamed/reformatted copies score high, independent answers low; grades untouched."""

from __future__ import annotations

import csv

import _toy
import nbformat

from quantcourse.grading.similarity import normalise, similarity, similarity_report

ORIGINAL = '''
def fake_quant(x, n_bits):
    """Round to the grid."""
    qmax = 2 ** (n_bits - 1) - 1
    scale = x.abs().max() / qmax
    codes = (x / scale).round().clamp(-qmax, qmax)
    return codes * scale
'''
RENAMED = """
def fake_quant(t,b):
    # my own work, honestly
    top=2**(b-1)-1
    s=t.abs().max()/top
    c=(t/s).round().clamp(-top,top)
    return c*s
"""
DIFFERENT = """
def fake_quant(x, n_bits):
    levels = torch.arange(-(2 ** (n_bits - 1) - 1), 2 ** (n_bits - 1), dtype=x.dtype)
    step = torch.max(torch.abs(x)) / levels.max()
    grid = levels * step
    nearest = torch.argmin((x.reshape(-1, 1) - grid).abs(), dim=1)
    return grid[nearest].reshape(x.shape)
"""

MASTER_COPY = """def fake_quant(v, bits):
    m = 2 ** (bits - 1) - 1
    s = absmax_scale(v, bits)
    return (v / s).round().clamp(-m, m) * s
"""


def test_names_formatting_comments_and_docstrings_do_not_matter():
    assert normalise(ORIGINAL) == normalise(RENAMED)
    assert similarity(ORIGINAL, RENAMED) == 1.0
    assert similarity(ORIGINAL, DIFFERENT) < 0.3
    assert similarity("x = 1", "x = 1") == 0.0  # too short to call a copy
    assert normalise("def f(:") == []


def test_report_flags_copies_of_each_other_and_of_the_master(tmp_path):
    master = _toy.FIXTURE / "solutions" / _toy.ASSIGNMENT / _toy.NOTEBOOK
    release_like = nbformat.read(master, as_version=4)
    paths = {}
    for student, source in {"ann": ORIGINAL, "ben": RENAMED, "cat": DIFFERENT, "dan": MASTER_COPY}.items():
        nb = _toy.answered(master, {"fake_quant": source, "absmax_scale": "def absmax_scale(x, n_bits):\n    return 1"})
        paths[student] = tmp_path / f"{student}.ipynb"
        nbformat.write(nb, paths[student])
    assert release_like.cells  # the master is read, not changed
    matches = similarity_report(
        "f01_toy", master, paths, targets=["quantcourse.primitives.fake_quantize"], out=tmp_path / "similarity"
    )
    pairs = {(m.student, m.other) for m in matches}
    assert ("ann", "ben") in pairs
    assert not any("cat" in pair for pair in pairs)
    assert ("dan", "master solution of fake_quant") in pairs  # the master's own solution, copied
    rows = list(csv.DictReader((tmp_path / "similarity" / "f01_toy.csv").open()))
    assert {(r["student"], r["other"]) for r in rows} == pairs
    assert "grades are not changed" in (tmp_path / "similarity" / "f01_toy.md").read_text()
