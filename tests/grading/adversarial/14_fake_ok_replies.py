# ruff: noqa: E501 - the submissions are code in strings
"""Give itself points through the reporting: forged outputs, partial-credit results, fake pipe replies."""

import nbformat

from . import WRONG_FAKE_QUANT, WRONG_SCALE

EARNED = 0.0
ANSWERS = {
    "absmax_scale": (
        "import json, os\n"
        "def _forge():\n"
        "    for fd in range(3, 64):\n"
        "        try:\n"
        "            for i in range(1, 200):\n"
        "                h = json.dumps({'id': i, 'value': {'t': 'dict', 'k': ['result', 'changed'], 'v': [None, {'t': 'list', 'v': []}]}, 'blobs': []}).encode()\n"
        "                os.write(fd, len(h).to_bytes(8, 'big') + h)\n"
        "        except OSError:\n"
        "            pass\n"
        "_forge()\n5.0\n" + WRONG_SCALE + "    \n"
    ),
    "fake_quant": WRONG_FAKE_QUANT,
}


def edit(nb):
    """Forge results into the notebook itself: 'ok' outputs, partial credit, points in the metadata."""
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade"):
            cell.outputs = [
                nbformat.v4.new_output("execute_result", data={"text/plain": str(meta["points"])}, execution_count=1)
            ]
        if meta.get("solution"):
            meta.update(grade=True, points=100)
    nb.metadata["quantcourse"] = {"trusted": "0" * 64}
