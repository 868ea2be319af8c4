"""The curated public API: every exported name exists and is documented; import stays light."""

import subprocess
import sys

import pytest

import quantcourse as qc


def test_every_public_name_resolves_and_is_documented():
    for name in qc.__all__:
        obj = getattr(qc, name)
        assert obj.__doc__ and obj.__doc__.strip(), f"quantcourse.{name} has no docstring"


def test_unknown_attribute_raises_attribute_error():
    try:
        qc.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_import_needs_neither_transformers_nor_triton():
    code = "import sys, quantcourse; print('transformers' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_html_table_formats_and_escapes():
    from quantcourse.display import html_table

    html = html_table([{"method": "W<4", "ppl": 13.678}], fmt={"ppl": ".2f"})
    assert "<th>method</th><th>ppl</th>" in html and '<td class="text">W&lt;4</td><td>13.68</td>' in html


def test_html_table_shows_a_missing_value_as_a_dash_in_a_formatted_column():
    from quantcourse.display import html_table

    html = html_table([{"ppl": 13.678}, {"ppl": None}], fmt={"ppl": ".2f"})
    assert "<td>13.68</td>" in html and '<td class="text">-</td>' in html


def test_markdown_table_reads_the_first_table_between_prose():
    from quantcourse.display import markdown_table

    text = (
        "# title\n\n- date: today\n\n"
        "| format | M w/s |\n|---|---:|\n| Q8_0 | 477.0 |\n| `Q4_0` | 380.0 |\n\n"
        "after\n| x |\n|---|\n| 1 |\n"
    )
    assert markdown_table(text) == [{"format": "Q8_0", "M w/s": "477.0"}, {"format": "`Q4_0`", "M w/s": "380.0"}]


def test_markdown_table_says_what_is_wrong():
    from quantcourse.display import markdown_table

    with pytest.raises(ValueError, match="no markdown table"):
        markdown_table("| a | b |\nno separator line\n")
    with pytest.raises(ValueError, match="3 cells where the header has 2"):
        markdown_table("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n")


def test_markdown_table_reads_the_committed_benchmark_results_the_book_quotes():
    from pathlib import Path

    from quantcourse.display import markdown_table
    from quantcourse.gguf import FORMATS

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    gguf = markdown_table((results / "gguf.md").read_text())
    assert [r["format"] for r in gguf] == list(FORMATS)
    one_thread = (results / "primitives.md").read_text().split("\n## 1 thread\n")[1]
    assert any(r["operation"].startswith("`dst.copy_") for r in markdown_table(one_thread))
