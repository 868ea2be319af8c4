"""The `quantcourse` command line: doctor, release / check-release, selfcheck (on the toy course)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import _toy
import nbformat
import pytest

from quantcourse.cli import main


def test_doctor_reports_versions_device_and_model(capsys):
    status = main(["doctor"])
    out = capsys.readouterr().out
    for name in ("python", "torch", "transformers", "gguf", "nbgrader", "jupyter-book", "triton", "device"):
        assert name in out
    assert ("CUDA:" in out) or ("CPU (" in out)
    assert status == 0 and "course model" in out and ".gguf" in out
    import torch

    from quantcourse.kernels import available

    assert f"kernels       {available()['note']}" in out, "doctor says where the Triton kernels run"
    assert ("hidden tests run on cuda" if torch.cuda.is_available() else "hidden tests run on cpu") in out
    assert out.count("\ngpu ") == torch.cuda.device_count(), "one line per visible GPU"


def test_console_script_is_installed():
    exe = shutil.which("quantcourse", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe is not None, "reinstall the project: pip install -e '.[test]'"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for command in ("doctor", "release", "check-release", "autograde", "selfcheck"):
        assert command in result.stdout


def test_no_course_root_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no course root"):
        main(["release"])


def test_unknown_assignment_is_a_clear_error(tmp_path, capsys):
    _toy.make_course(tmp_path)
    assert main(["--root", str(tmp_path), "release", "a99_nothing"]) == 2
    assert "no assignment 'a99_nothing'" in capsys.readouterr().err


@pytest.mark.slow
def test_release_then_check_release_then_tamper(tmp_path, capsys):
    course = _toy.make_course(tmp_path)
    assert main(["--root", str(tmp_path), "release"]) == 0
    assert main(["--root", str(tmp_path), "check-release"]) == 0
    assert "in sync" in capsys.readouterr().out
    released = course.release / _toy.ASSIGNMENT / _toy.NOTEBOOK
    nb = nbformat.read(released, as_version=4)
    nb.cells[2].source = "### BEGIN SOLUTION\n" + nb.cells[2].source
    nbformat.write(nb, released)
    (course.release / "a00_orphan").mkdir()
    (course.release / "a00_orphan" / "x.ipynb").write_text("{}")
    assert main(["--root", str(tmp_path), "check-release"]) == 1
    out = capsys.readouterr().out
    assert f"{_toy.ASSIGNMENT}/{_toy.NOTEBOOK}: contains 'BEGIN SOLUTION'" in out
    assert f"{_toy.ASSIGNMENT}/{_toy.NOTEBOOK}: differs from a fresh release" in out
    assert "a00_orphan/x.ipynb: in course/ but not generated from the source" in out
    assert main(["--root", str(tmp_path), "release"]) == 0  # releasing all removes the orphan
    assert not (course.release / "a00_orphan").exists()


@pytest.mark.slow
def test_selfcheck_passes_a_good_assignment_and_fails_a_broken_one(tmp_path, capsys):
    course = _toy.make_course(tmp_path)
    broken = course.source / "f02_broken"
    broken.mkdir()
    nb = nbformat.read(course.source / _toy.ASSIGNMENT / _toy.NOTEBOOK, as_version=4)
    for cell in nb.cells:  # a wrong solution for absmax_scale: its 2 points are lost
        cell.source = cell.source.replace(
            "return x.abs().max() / (2 ** (n_bits - 1) - 1)", "return x.abs().max() / 2 ** (n_bits - 1)"
        )
    nbformat.write(nb, broken / "f02_broken.ipynb")
    assert main(["--root", str(tmp_path), "selfcheck", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "ok   f01_toy" in captured.out and "solution 5/5" in captured.out
    assert "FAIL f02_broken" in captured.out
    assert "solution scores 0/5, expected full marks" in captured.out  # fake_quant calls absmax_scale too
    assert "selfcheck failed for: f02_broken" in captured.err
