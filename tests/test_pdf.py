"""``.ci/pdf.py`` (``make pdf``): the single-page book printed to one PDF by headless Chromium.

The page-finding rule runs everywhere; printing a small single-page build is skipped, with the reason,
when Playwright or Chromium is missing (``.ci/run`` installs Chromium).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_pdf_script():
    sys.path.insert(0, str(ROOT / ".ci"))  # pdf.py imports find_browser from its neighbour screenshots.py
    try:
        spec = importlib.util.spec_from_file_location("ci_pdf", ROOT / ".ci" / "pdf.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / ".ci"))
    return module


pdf = _load_pdf_script()


def _singlehtml(tmp_path: Path) -> Path:
    """A build laid out as jupyter-book's singlehtml writes it: index.html redirects to book/intro.html,
    whose stylesheet and figure links are relative to the top folder."""
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "style.css").write_text("h1 { color: rgb(200, 0, 0); }")
    (tmp_path / "book").mkdir()
    page = (
        '<html><head><link rel="stylesheet" href="_static/style.css" /></head>'
        "<body><h1>Chapter 1</h1><p>x = 1</p><h1>Chapter 2</h1></body></html>"
    )
    (tmp_path / "book" / "intro.html").write_text(page)
    (tmp_path / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=book/intro.html" />')
    return tmp_path / "index.html"


def test_the_page_is_a_copy_of_the_redirect_target_beside_index(tmp_path):
    index = _singlehtml(tmp_path)
    page = pdf.the_page(index)
    assert page.parent == index.parent  # where _static/style.css resolves
    assert page.read_text() == (tmp_path / "book" / "intro.html").read_text()
    assert (page.parent / "_static" / "style.css").is_file()


def test_a_page_without_redirect_is_printed_as_it_is(tmp_path):
    index = tmp_path / "index.html"
    index.write_text("<html><body><h1>All of it</h1></body></html>")
    assert pdf.the_page(index) == index


def test_a_missing_build_says_how_to_make_it(tmp_path):
    with pytest.raises(SystemExit, match="build the single-page book first"):
        pdf.main(str(tmp_path / "index.html"), str(tmp_path / "book.pdf"))


needs_browser = [
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="Playwright is not installed"),
    pytest.mark.skipif(
        not any(map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
        reason="no Chromium (Debian: apt-get install -y chromium)",
    ),
]


@needs_browser[0]
@needs_browser[1]
def test_prints_the_single_page_build_to_a_pdf(tmp_path):
    index = _singlehtml(tmp_path)
    out = tmp_path / "out" / "book.pdf"
    assert pdf.main(str(index), str(out)) == 0
    data = out.read_bytes()
    assert data.startswith(b"%PDF-") and len(data) > 1000


@needs_browser[0]
@needs_browser[1]
def test_refuses_to_print_a_page_whose_stylesheet_or_figures_do_not_load(tmp_path):
    index = _singlehtml(tmp_path)
    (tmp_path / "_static" / "style.css").unlink()  # as when the page was opened where its links do not resolve
    with pytest.raises(SystemExit, match=r"1 files of .* did not load, so no PDF: .*style\.css"):
        pdf.main(str(index), str(tmp_path / "book.pdf"))
    assert not (tmp_path / "book.pdf").exists()
