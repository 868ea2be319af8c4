"""The curated public API: every exported name exists and is documented; import stays light."""

import subprocess
import sys

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
