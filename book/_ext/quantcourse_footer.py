"""Sphinx extension of the book: the page footer names the package version and the build date.

The version is the installed ``quantcourse`` distribution's (pyproject.toml), so a published book says
which library its numbers were computed with. The date is the UTC build date, or the date of
``SOURCE_DATE_EPOCH`` when that is set (reproducible builds). Also registers the book's stylesheet,
``_static/quantcourse.css`` (table padding, wide outputs), which Jupyter Book adds to every page itself.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed quantcourse version, or "unknown" outside an installed environment."""
    try:
        return version("quantcourse")
    except PackageNotFoundError:
        return "unknown"


def build_date() -> str:
    """YYYY-MM-DD (UTC) of this build, or of SOURCE_DATE_EPOCH when set."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%d")


def footer_html() -> str:
    return f'<p class="quantcourse-footer">quantcourse {package_version()} · built {build_date()}</p>'


def _set_footer(app, config) -> None:
    options = dict(config.html_theme_options or {})
    options["extra_footer"] = footer_html()
    config.html_theme_options = options
    config.version = config.release = package_version()


def setup(app):
    app.connect("config-inited", _set_footer)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
