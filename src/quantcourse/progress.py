"""Progress bars for the library's long loops: a notebook widget in JupyterLab, plain text elsewhere.

Every long loop of the library (blocks of a model, calibration batches, exported tensors) shows a tqdm
bar through :func:`progress_bar`. ``tqdm.auto`` picks a Jupyter widget inside a kernel; an executed notebook
that keeps such a widget makes its HTML page (the book, nbgrader feedback) load require.js and a widget
manager from a CDN, which shows a blank box offline. So the environment variable
``QUANTCOURSE_PROGRESS`` chooses:

- ``auto`` (the default): ``tqdm.auto``, the widget in a notebook and text in a terminal;
- ``plain``: text bars on stderr everywhere (the book build and the autograder set this; the book
  drops stderr from its pages);
- ``off``: no bars at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar", "progress_mode", "MODES"]

MODES = ("auto", "plain", "off")


def progress_mode() -> str:
    """The bar style ``QUANTCOURSE_PROGRESS`` asks for (``auto`` when unset)."""
    mode = os.environ.get("QUANTCOURSE_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"QUANTCOURSE_PROGRESS={mode!r} is not one of {', '.join(MODES)}; unset it or pick one")
    return mode


def progress_bar(iterable: Iterable | None = None, **kwargs: Any):
    """A tqdm bar over ``iterable`` in the style :func:`progress_mode` names; ``kwargs`` go to tqdm.

    ``disable=True`` (the library's ``progress=False``) hides the bar in every mode.
    """
    mode = progress_mode()
    if mode == "auto":
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    if mode == "off":
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
