"""Full-page screenshots of every page of the built book, in headless Chromium.

Kept as build artefacts (``_build/screenshots/<page>.png``) so that a reviewer can see every chapter
as a reader does without building the book: tables, figures, equations and code listings included.
Playwright (from PyPI) drives the system's Chromium through its executable path; nothing is
downloaded (``playwright install`` is never needed). Pages are opened from ``file://``, so a page
that tried to load a script from the network would show it here as well.

Usage: python .ci/screenshots.py [HTML_DIR] [OUT_DIR]   (defaults: _build/html _build/screenshots)
Environment: CHROMIUM (the browser's path; default: the first of chromium, chromium-browser,
google-chrome on PATH).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import yaml

WIDTH = 1280  # CSS pixels: a laptop screen, wide enough for the sidebar and the text column
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str:
    """The Chromium executable: $CHROMIUM, else the first browser on PATH."""
    candidate = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if not candidate or not Path(candidate).exists():
        raise SystemExit(
            "no Chromium found: install it (Debian: apt-get install -y chromium) or set CHROMIUM to its path"
        )
    return candidate


def book_pages(html_dir: Path, toc: Path = Path("_toc.yml")) -> list[Path]:
    """The HTML pages of the files that _toc.yml names, in book order."""
    names: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    names.append(node[key])
            for value in node.values():
                if isinstance(value, (dict, list)):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(toc.read_text()))
    pages = [html_dir / f"{name}.html" for name in names]
    missing = [str(p) for p in pages if not p.is_file()]
    if missing:
        raise SystemExit(f"pages missing from {html_dir} (build the book first: make book): {', '.join(missing)}")
    return pages


def main(html_dir: str = "_build/html", out_dir: str = "_build/screenshots") -> int:
    from playwright.sync_api import sync_playwright

    html, out = Path(html_dir).resolve(), Path(out_dir)
    pages = book_pages(html)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_browser(), args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": WIDTH, "height": 900}, device_scale_factor=1)
        page = context.new_page()
        for path in pages:
            page.goto(path.as_uri(), wait_until="load")
            # MathJax (the offline copy) typesets after load: wait for it, so that equations are drawn.
            page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise.then(() => 1) : 1")
            target = out / f"{path.stem}.png"
            page.screenshot(path=str(target), full_page=True)
            print(f"{target} ({target.stat().st_size // 1024} KiB)")
        browser.close()
    print(f"{len(pages)} screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
