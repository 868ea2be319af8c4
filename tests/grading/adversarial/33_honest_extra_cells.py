# ruff: noqa: E501 - the submissions are code in strings
"""Honest: a helper in an added cell that the answer uses, a scratch cell that fails, a restarted kernel's outputs."""

import nbformat

EARNED = 5.0
ANSWERS = {
    "absmax_scale": "def absmax_scale(x, n_bits):\n    return _qmax_scale(x, n_bits)\n",
    "fake_quant": "def fake_quant(x, n_bits):\n    qmax = 2 ** (n_bits - 1) - 1\n    scale = absmax_scale(x, n_bits)\n"
    "    return (x / scale).round().clamp(-qmax, qmax) * scale\n",
}


def edit(nb):
    helper = nbformat.v4.new_code_cell(
        "def _qmax_scale(x, n_bits):\n    return x.abs().max() / (2 ** (n_bits - 1) - 1)\n"
    )
    scratch = nbformat.v4.new_code_cell("undefined_name + 1  # scratch work that fails")
    nb.cells.insert(1, helper)
    nb.cells.append(scratch)
    for cell in nb.cells:  # leftovers of an earlier kernel: errors, counts, stale outputs
        if cell.cell_type == "code":
            cell.execution_count = 7
            cell.outputs = [nbformat.v4.new_output("error", ename="NameError", evalue="stale", traceback=["stale"])]
