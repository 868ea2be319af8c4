"""Copies are seen: near-identical answers, after normalising names and formatting, for review.

For each answer cell of an assignment, every submission's code is normalised (parsed; docstrings and
comments dropped; every name the student chose renamed by order of first use: ``v0, v1, ...``; library
and builtin attributes kept) and cut into 6-grams of AST node tokens. Two answers whose token sets have
a Jaccard similarity of at least ``threshold`` are reported, and so is an answer close to the library's
reference of a function the hidden tests forbid, or to the master's own solution.

The report (``similarity/<assignment>.csv`` and ``.md``) is for the instructor to read: it never changes a
grade (short answers such as ``return n_params * bits / 8`` are bound to look alike).
"""

from __future__ import annotations

import ast
import builtins
import csv
import dataclasses
import inspect
import re
from pathlib import Path

import nbformat

__all__ = ["normalise", "similarity", "Match", "similarity_report"]

_NGRAM = 6
_MIN_TOKENS = 12  # answers shorter than this are too short to call copies


class _Rename(ast.NodeTransformer):
    """Rename the names a student chose (args, locals, functions) by order of first appearance."""

    def __init__(self):
        self.names: dict[str, str] = {}

    def _name(self, name: str) -> str:
        if name in vars(builtins) or name in ("torch", "qc", "math", "np", "F", "nn"):
            return name
        return self.names.setdefault(name, f"v{len(self.names)}")

    def visit_Name(self, node):
        node.id = self._name(node.id)
        return node

    def visit_arg(self, node):
        node.arg = self._name(node.arg)
        node.annotation = None
        return node

    def visit_FunctionDef(self, node):
        node.name = self._name(node.name)
        node.returns = None
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            body = body[1:] or [ast.Pass()]
        node.body = body
        self.generic_visit(node)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        node.name = self._name(node.name)
        self.generic_visit(node)
        return node


def normalise(source: str) -> list[str]:
    """AST tokens of ``source`` with names, formatting, comments and docstrings normalised away."""
    source = re.sub(r"^\s*[%!].*$", "", source, flags=re.M)  # magics
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    tree = _Rename().visit(tree)
    tokens = []
    for node in ast.walk(tree):
        token = type(node).__name__
        if isinstance(node, ast.Name):
            token += ":" + node.id
        elif isinstance(node, ast.Attribute):
            token += ":" + node.attr
        elif isinstance(node, ast.Constant) and not isinstance(node.value, str):
            token += ":" + repr(node.value)
        elif isinstance(node, ast.arg):
            token += ":" + node.arg
        tokens.append(token)
    return tokens


def _shingles(tokens: list[str]) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + _NGRAM]) for i in range(max(0, len(tokens) - _NGRAM + 1))}


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the normalised 6-grams of two sources (0 when either is too short)."""
    ta, tb = normalise(a), normalise(b)
    if min(len(ta), len(tb)) < _MIN_TOKENS:
        return 0.0
    sa, sb = _shingles(ta), _shingles(tb)
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


@dataclasses.dataclass(frozen=True)
class Match:
    """Two answers of one cell that look alike (``other`` is a student or ``reference:...``)."""

    assignment: str
    grade_id: str
    student: str
    other: str
    similarity: float


def _answer_sources(nb, grade_ids: set[str]) -> dict[str, str]:
    found: dict[str, list[str]] = {}
    for cell in nb.cells:
        grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if cell.get("cell_type") == "code" and grade_id in grade_ids:
            found.setdefault(grade_id, []).append(cell.source)
    return {k: "\n".join(v) for k, v in found.items()}


_MARKER_LINE = re.compile(r"^[ \t]*### (BEGIN|END) SOLUTION[ \t]*\n?", re.M)


def _references(master_path: Path, targets: list[str]) -> dict[str, str]:
    """The master's own solutions (by grade_id) and the library's forbidden functions' sources."""
    from .sandbox import _resolve

    refs = {}
    nb = nbformat.read(master_path, as_version=4)
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("solution") and cell.cell_type == "code":
            refs[f"master solution of {meta.get('grade_id')}"] = _MARKER_LINE.sub("", cell.source)
    for target in targets:
        try:
            obj = inspect.unwrap(_resolve(target))
            refs[f"reference:{obj.__module__}.{obj.__qualname__}"] = inspect.getsource(obj)
        except (ImportError, AttributeError, TypeError, OSError):
            continue
    return refs


def similarity_report(
    assignment: str,
    master_path: str | Path,
    submissions: dict[str, Path],
    *,
    targets: list[str] = (),
    threshold: float = 0.8,
    out: str | Path,
) -> list[Match]:
    """Compare the answer cells of ``submissions`` (student -> notebook path); write CSV and Markdown.

    Returns the matches at or above ``threshold``, most similar first. Unreadable notebooks are skipped.
    """
    master_path = Path(master_path)
    master = nbformat.read(master_path, as_version=4)
    grade_ids = {
        c.metadata["nbgrader"]["grade_id"]
        for c in master.cells
        if c.get("metadata", {}).get("nbgrader", {}).get("solution") and c.cell_type == "code"
    }
    answers: dict[str, dict[str, str]] = {}
    for student, path in sorted(submissions.items()):
        try:
            answers[student] = _answer_sources(nbformat.read(path, as_version=4), grade_ids)
        except Exception:  # noqa: BLE001, S112 - an unreadable notebook has its own status in the grades
            continue
    refs = _references(master_path, list(targets))
    matches = []
    for grade_id in sorted(grade_ids):
        sources = {s: a[grade_id] for s, a in answers.items() if grade_id in a}
        shingles = {}
        for s, src in sources.items():
            tokens = normalise(src)
            shingles[s] = _shingles(tokens) if len(tokens) >= _MIN_TOKENS else set()
        ref_shingles = {name: _shingles(normalise(src)) for name, src in refs.items()}
        students = sorted(sources)
        for i, a in enumerate(students):
            sa = shingles[a]
            if not sa:
                continue
            for b in students[i + 1 :]:
                sb = shingles[b]
                if sb and len(sa & sb) / len(sa | sb) >= threshold:
                    matches.append(Match(assignment, grade_id, a, b, round(len(sa & sb) / len(sa | sb), 3)))
            for name, sr in ref_shingles.items():
                if name.startswith("master solution of ") and name != f"master solution of {grade_id}":
                    continue
                if sr and len(sa & sr) / len(sa | sr) >= threshold:
                    matches.append(Match(assignment, grade_id, a, name, round(len(sa & sr) / len(sa | sr), 3)))
    matches.sort(key=lambda m: (-m.similarity, m.grade_id, m.student, m.other))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{assignment}.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["assignment", "grade_id", "student", "other", "similarity"])
        for m in matches:
            writer.writerow([m.assignment, m.grade_id, m.student, m.other, f"{m.similarity:.3f}"])
    lines = [
        f"# Similar answers in {assignment}",
        "",
        f"Answer cells whose normalised code overlaps at least {threshold:.0%} (6-grams of AST tokens, names "
        "and formatting ignored) with another submission, the master's solution or the library's reference. "
        "For review only: grades are not changed.",
        "",
        "| cell | student | looks like | similarity |",
        "|---|---|---|---|",
        *[f"| {m.grade_id} | {m.student} | {m.other} | {m.similarity:.2f} |" for m in matches],
    ]
    if not matches:
        lines.append("| (none) | | | |")
    (out / f"{assignment}.md").write_text("\n".join(lines) + "\n")
    return matches
