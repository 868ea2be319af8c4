"""Check the built book for pages that would need the network: scripts or stylesheets from a CDN.

The book must render offline (MathJax is served locally by sphinx-mathjax-offline; progress bars are
plain text, so no tqdm widget pulls require.js and a widget manager from a CDN). Scans every HTML file
under the given directory for <script src=...> and <link href=...> that point off the site, and for
the names of the usual CDNs and loaders. Exits 1 and lists each offender.

Usage: python .ci/check_book_html.py _build/html
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REMOTE_ASSET = re.compile(r"<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*[\"']((?:https?:)?//[^\"']+)", re.I)
CDN_NAMES = re.compile(r"cdn\.jsdelivr|jsdelivr\.net|unpkg\.com|cdnjs|require(?:\.min)?\.js|@jupyter-widgets", re.I)


# sphinx-book-theme writes sphinx-thebe's CDN address into every page as a string constant; sphinx-thebe.js
# fetches it only when a reader clicks a Thebe launch button. A page without such a button loads nothing.
INERT_THEBE_URL = re.compile(r"const THEBE_JS_URL = \"[^\"]*\";")


def offenders(html_dir: Path) -> list[str]:
    """'file: what' for every remote script or stylesheet, or CDN/loader name, in the HTML files."""
    found = []
    for page in sorted(html_dir.rglob("*.html")):
        text = page.read_text(errors="replace")
        if "thebe-launch-button" not in text:
            text = INERT_THEBE_URL.sub("", text)
        for url in REMOTE_ASSET.findall(text):
            found.append(f"{page.relative_to(html_dir)}: loads {url}")
        for name in sorted(set(CDN_NAMES.findall(text))):
            found.append(f"{page.relative_to(html_dir)}: mentions {name}")
    return found


def main(html_dir: str) -> int:
    root = Path(html_dir)
    if not (root / "index.html").is_file():
        print(f"{root}/index.html not found: build the book first (make book)")
        return 1
    bad = offenders(root)
    for line in bad:
        print(line)
    n_pages = len(list(root.rglob("*.html")))
    print(f"{n_pages} pages checked: {'no remote scripts or stylesheets' if not bad else f'{len(bad)} problems'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
