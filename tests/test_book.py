"""The book's prose types no computed number: every such number is glued from the executed notebook.

A number that a notebook computes (a perplexity, an SQNR, a percentage of something measured) goes
into the text through myst-nb's ``{glue:text}`name:format``` role, so that it can never disagree with
the tables it comes from. This test reads the markdown cells of every chapter and flags numbers that
look measured: decimals (``13.68``, ``0.047``) and percentages (``59%``, ``6.0 %``).

Not flagged: math (``$...$``), code spans and blocks, glue and cite roles, markdown tables (the cited
tables of papers), paragraphs that cite a source with ``{cite:...}`` (numbers quoted from a paper),
and the definitional constants listed in ``ALLOWED`` with the reason each may be typed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))

# Typed numbers that are not measurements: constants of formats and hardware, definitions, arithmetic
# shown as a worked example, and numbers quoted from a source named in the same sentence.
ALLOWED = {
    "01_memory": {"46.7B", "90 %", "100 %"},  # Mixtral's parameter count (model card); kernels' share of bandwidth
    "02_absmax_zeropoint": {"0.0078431", "63.75", "0.50196", "0.002", "127.5", "6.02", "63.5", "62.5", "0.17", "0.0"},
    "03_granularity": {"4.25", "4.5", "4.5 \\times 128", "0.25", "0.5"},  # 16/g overheads, 576 = 4.5 x 128
    "04_calibration": {"99.99", "0.01"},  # the percentile observer's default, the moving average's constant
    "05_qat": {"62.0", "63.6", "64.0", "65.6", "33 %"},  # LLM-QAT's README table; chance on three classes
    "07_awq": {"1%", "0.55"},  # the paper's 1% budget of kept channels; the clip search's floor (1 - 9/20)
    "08_smoothquant": {"0.8", "0.9"},  # the alpha the authors' scripts use for Llama-2/3 and Mistral
    "09_llm_int8": {"6.7", "25%", "6%", "75%", "0.1%"},  # the paper's outlier definition and its findings
    "12_triton": {"3.35", "2.5"},  # the H100 SXM datasheet's bandwidth; the issue's speed-up goal
    "11_gguf": {"0.3.36", "0.25.3", "2.25", "4.84", "6.56", "0.05", "4.8", "6.5625", "4.5", "0.5", "3.5", "8.5"},
}

NUMBER = re.compile(r"(?<![\w.\-])(\d+\.\d+(?:\s?%)?|\d+\s?%)(?![\w.])")


def prose(markdown: str) -> list[str]:
    """Paragraphs of a markdown cell with math, code, roles, links and tables removed."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)  # fenced code and directives
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)  # display math
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        if para.lstrip().startswith("|"):  # a markdown table
            continue
        cited = "{cite:" in para
        para = re.sub(r"\{[\w:]+\}`[^`]*`", " ", para)  # roles: glue, cite, ref, numref
        para = re.sub(r"`[^`]*`", " ", para)  # code spans
        para = re.sub(r"\$[^$]*\$", " ", para)  # inline math
        para = re.sub(r"\]\([^)]*\)", "]", para)  # link targets
        paragraphs.append("" if cited else para)
    return paragraphs


def typed_numbers(notebook: Path) -> list[str]:
    nb = json.loads(notebook.read_text())
    allowed = ALLOWED.get(notebook.stem, set())
    found = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for para in prose("".join(cell["source"])):
            for match in NUMBER.finditer(para):
                number = match.group(1)
                context = para[max(0, match.start() - 30) : match.end() + 30].replace("\n", " ")
                if number in allowed or any(a in context and number in a for a in allowed):
                    continue
                found.append(f"{number!r} in '...{context}...'")
    return found


def test_the_scanner_flags_typed_measurements_and_skips_what_is_not_one():
    paras = prose(
        "GPTQ takes perplexity from 17.25 to 16.39, a 5.1 % gain, and {glue:text}`x:.2f` is glued.\n\n"
        "In math $s = 0.5$ and code `0.25` nothing counts.\n\n"
        "The paper reports 27.65 {cite:p}`frantar2023gptq`.\n\n| a | 1.5 |\n|---|---|"
    )
    hits = [m.group(1) for p in paras for m in NUMBER.finditer(p)]
    assert hits == ["17.25", "16.39", "5.1 %"]


@pytest.mark.parametrize("notebook", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_no_computed_number_is_typed_in_the_prose(notebook):
    found = typed_numbers(notebook)
    assert found == [], (
        f"{notebook.name}: numbers typed in the prose; glue them from the notebook "
        f"(from myst_nb import glue; {{glue:text}}`name:.2f`), or, for a constant or a cited figure, "
        f"add them to ALLOWED with the reason: " + "; ".join(found)
    )
