"""nbconvert preprocessors that nbgrader's feedback step runs (configured in ``config.configure``).

Autograded notebooks contain the hidden tests (nbgrader puts them back before executing), so feedback
made from them would show their code, both in the cell and in every traceback that passes through it.
``ShortenHiddenTracebacks`` cuts the traceback of a cell that holds hidden tests to its last line (the
exception and its message, which hidden tests word for the student), then ``HideHiddenTests`` removes the
hidden region from the source. Order matters: shorten first, while the markers are still there.
"""

from __future__ import annotations

from nbgrader.preprocessors import ClearHiddenTests, NbGraderPreprocessor
from traitlets import Bool, Unicode

__all__ = ["HideHiddenTests", "ShortenHiddenTracebacks", "HIDDEN_NOTE"]

HIDDEN_NOTE = "(a hidden test raised this; the hidden tests' code is not shown)"


class HideHiddenTests(ClearHiddenTests):
    """nbgrader's ``ClearHiddenTests``, enabled for the feedback step."""

    enabled = Bool(True).tag(config=True)


class ShortenHiddenTracebacks(NbGraderPreprocessor):
    """Replace the traceback of every error in a hidden-test cell by ``ename: evalue`` and a note."""

    enabled = Bool(True).tag(config=True)
    begin_test_delimeter = Unicode("BEGIN HIDDEN TESTS").tag(config=True)
    note = Unicode(HIDDEN_NOTE).tag(config=True)

    def preprocess_cell(self, cell, resources, cell_index):
        if cell.cell_type != "code" or self.begin_test_delimeter not in cell.source:
            return cell, resources
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                output["traceback"] = [f"{output.get('ename', 'Error')}: {output.get('evalue', '')}", self.note]
        return cell, resources
