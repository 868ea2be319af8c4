"""The trusted path's pieces: the canonical program, stripping the library, signatures, shards."""

from __future__ import annotations

import copy

import _toy
import nbformat
import pytest

from quantcourse.grading.autograde import _in_shard, parse_shard, sign, verify
from quantcourse.grading.preprocessors import NOT_TRUSTED, TrustedResults
from quantcourse.grading.sandbox import _strip_source, build_library_view
from quantcourse.grading.trusted import Master, canonical_program

MASTER = _toy.FIXTURE / "solutions" / _toy.ASSIGNMENT / _toy.NOTEBOOK


def test_master_cells_are_classified():
    master = Master(MASTER)
    assert [c.kind for c in master.cells if c.kind != "markdown"] == ["locked", "answer", "test", "answer", "test"]
    assert master.by_id["absmax_scale"].names == ("absmax_scale",)


def test_program_takes_answers_and_added_cells_but_master_locked_cells_and_no_tests():
    master = Master(MASTER)
    nb = nbformat.read(MASTER, as_version=4)
    sub = copy.deepcopy(nb)
    for cell in sub.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id == "setup":
            cell.source = "import os; os.system('evil')"  # a student's edit of a locked cell
        if grade_id == "absmax_scale":
            cell.source = "def absmax_scale(x, n_bits):\n    return 1"
    sub.cells.append(nbformat.v4.new_code_cell("helper = 1"))
    program = canonical_program(master, sub)
    sources = [source for _, source, _ in program]
    assert master.by_id["setup"].source in sources and "evil" not in "".join(sources)
    assert "def absmax_scale(x, n_bits):\n    return 1" in sources and "helper = 1" in sources
    assert not any("BEGIN HIDDEN TESTS" in s or "assert torch.isclose" in s for s in sources)
    # the student deleted the setup cell: it is put back first
    sub.cells = [c for c in sub.cells if c.metadata.get("nbgrader", {}).get("grade_id") != "setup"]
    assert canonical_program(master, sub)[0][1] == master.by_id["setup"].source


def test_strip_source_stubs_functions_and_class_methods():
    source = (
        "def f(x):\n    return x + 1\n\n"
        "class C:\n    def __init__(self):\n        self.a = 1\n\n    def g(self):\n        return 2\n"
    )
    out = _strip_source(source, {"f": "m.f", "C": "m.C"})
    ns = {}
    exec(out, ns)
    with pytest.raises(AssertionError, match="calling m.f does not count"):
        ns["f"](1)
    c = ns["C"]()
    assert c.a == 1  # __init__ kept
    with pytest.raises(AssertionError, match="calling m.C does not count"):
        c.g()
    assert "x + 1" not in out and "return 2" not in out


def test_library_view_has_no_reference_code_of_the_targets(tmp_path):
    view = build_library_view(["quantcourse.fake_quantize", "torch.quantile", "quantcourse.nothing_here"], tmp_path)
    assert view.stripped == ("quantcourse.primitives.fake_quantize",)
    assert view.runtime == ("torch.quantile",)
    ((copy_dir, original),) = view.mounts
    text = (tmp_path / "quantcourse" / "primitives.py").read_text()
    assert "calling quantcourse.primitives.fake_quantize does not count" in text
    assert not list((tmp_path / "quantcourse").rglob("*.pyc")) or all(
        "__pycache__" in str(p) for p in (tmp_path / "quantcourse").rglob("*.pyc")
    )


def test_signatures_verify_only_unchanged_notebooks():
    key = b"k" * 32
    nb = sign(key, nbformat.read(MASTER, as_version=4))
    nb = nbformat.reads(nbformat.writes(nb), as_version=4)
    assert verify(key, nb) and not verify(b"other", nb)
    nb.cells[3].outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)]
    assert not verify(key, nb)


def test_nbgrader_refuses_unsigned_notebooks(tmp_path):
    (tmp_path / "key").write_bytes(b"k" * 32)
    pre = TrustedResults(key_file=str(tmp_path / "key"))
    with pytest.raises(RuntimeError, match="not graded by quantcourse's trusted grader"):
        pre.preprocess(nbformat.read(MASTER, as_version=4), {})
    signed = nbformat.reads(nbformat.writes(sign(b"k" * 32, nbformat.read(MASTER, as_version=4))), as_version=4)
    assert pre.preprocess(signed, {})[0] is signed
    assert "quantcourse autograde" in NOT_TRUSTED


def test_shards_partition_every_pair_once():
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "-1/2", "a/b", "1"):
        with pytest.raises(ValueError, match="i/N"):
            parse_shard(bad)
    pairs = [(f"s{i}", f"a{j}") for i in range(50) for j in range(3)]
    owners = [[k for k in range(4) if _in_shard(s, a, (k, 4))] for s, a in pairs]
    assert all(len(o) == 1 for o in owners) and {o[0] for o in owners} == {0, 1, 2, 3}
