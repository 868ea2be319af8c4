"""nbconvert preprocessors that nbgrader runs (configured in ``config.configure``).

``TrustedResults`` takes the place of nbgrader's ``Execute`` in ``autograde``: nbgrader never runs a
notebook. It accepts only notebooks signed by ``quantcourse autograde``'s trusted grader (their outputs
were written by the grader, not by the student's code) and raises for anything else, so a plain
``nbgrader autograde`` (or the formgrader's button) on raw submissions records nothing a student wrote.

Autograded notebooks contain the hidden tests (nbgrader puts them back before executing), so feedback
made from them would show their code, both in the cell and in every traceback that passes through it.
``ShortenHiddenTracebacks`` cuts the traceback of a cell that holds hidden tests to its last line (the
exception and its message, which hidden tests word for the student), then ``HideHiddenTests`` removes the
hidden region from the source. Order matters: shorten first, while the markers are still there.
"""

from __future__ import annotations

from pathlib import Path

from nbgrader.preprocessors import ClearHiddenTests, NbGraderPreprocessor
from traitlets import Bool, Unicode

__all__ = ["HideHiddenTests", "ShortenHiddenTracebacks", "TrustedResults", "HIDDEN_NOTE", "NOT_TRUSTED"]

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


NOT_TRUSTED = (
    "this notebook was not graded by quantcourse's trusted grader, so nbgrader will not record it: "
    "grade submissions with `quantcourse autograde SUBMISSIONS` (it runs students' code in a sandbox "
    "and records the results here)"
)


class TrustedResults(NbGraderPreprocessor):
    """In place of nbgrader's ``Execute``: pass signed notebooks through, refuse all others."""

    enabled = Bool(True).tag(config=True)
    key_file = Unicode("").tag(config=True)

    def preprocess(self, nb, resources):
        from .autograde import verify

        key = Path(self.key_file).read_bytes().strip() if self.key_file and Path(self.key_file).is_file() else b""
        if not key or not verify(key, nb):
            raise RuntimeError(NOT_TRUSTED)
        return nb, resources
