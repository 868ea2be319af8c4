"""The whole book as one PDF: the single-page HTML build printed by headless Chromium.

``make pdf`` builds ``_build/singlehtml/index.html`` with jupyter-book's ``singlehtml`` builder (from the
same execution cache as the HTML book, so no notebook runs twice) and prints it here to
``_build/quantcourse.pdf``. Nothing is downloaded: Playwright (from PyPI) drives the system's Chromium
through its executable path, the equations are typeset by the offline MathJax copy before printing, and
the theme's print stylesheet drops the navigation. (jupyter-book's own ``pdfhtml`` builder would fetch a
Chromium through pyppeteer, and ``pdflatex`` needs a TeX installation.)

Usage: python .ci/pdf.py [HTML] [PDF]   (defaults: _build/singlehtml/index.html _build/quantcourse.pdf)
Environment: CHROMIUM, as for .ci/screenshots.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from screenshots import find_browser  # noqa: E402  (one way to find the browser for both scripts)

REDIRECT = re.compile(r'<meta http-equiv="Refresh" content="0; url=([^"]+)"', re.IGNORECASE)


def the_page(index: Path) -> Path:
    """The single page itself, where its links resolve.

    jupyter-book's ``index.html`` only redirects to the root file's page (``book/intro.html``), whose
    links to ``_static/`` and ``_images/`` are nevertheless written relative to the build's top folder:
    opened where it lies, the page has no stylesheet and no figures. A copy beside ``index.html`` has both.
    """
    redirect = REDIRECT.search(index.read_text(encoding="utf-8"))
    if not redirect:
        return index
    single = index.parent / "quantcourse.html"
    single.write_text((index.parent / redirect.group(1)).read_text(encoding="utf-8"), encoding="utf-8")
    return single


def main(html: str = "_build/singlehtml/index.html", pdf: str = "_build/quantcourse.pdf") -> int:
    from playwright.sync_api import sync_playwright

    index, out = Path(html).resolve(), Path(pdf)
    if not index.is_file():
        raise SystemExit(f"{index} is missing: build the single-page book first (make pdf does)")
    page_path = the_page(index)
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_browser(), args=["--no-sandbox"])
        page = browser.new_page()
        # A stylesheet, figure or font that did not load would be missing from the PDF. (Scripts may: the
        # single-page build links the search index, which it does not write and the PDF does not need.)
        failed: list[str] = []
        page.on(
            "requestfailed",
            lambda r: (
                failed.append(f"{r.url} ({r.failure})") if r.resource_type in ("stylesheet", "image", "font") else None
            ),
        )
        page.goto(page_path.as_uri(), wait_until="load")
        if failed:
            browser.close()
            raise SystemExit(f"{len(failed)} files of {page_path} did not load, so no PDF: " + ", ".join(failed[:5]))
        page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise.then(() => 1) : 1")
        page.pdf(
            path=str(out),
            format="A4",
            print_background=True,  # the tables' shading and the code listings' background
            margin={"top": "18mm", "bottom": "18mm", "left": "15mm", "right": "15mm"},
            display_header_footer=True,
            header_template="<span></span>",
            footer_template=(
                '<div style="font-size:8px;width:100%;text-align:center;">'
                '<span class="pageNumber"></span> / <span class="totalPages"></span></div>'
            ),
        )
        browser.close()
    print(f"{out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
