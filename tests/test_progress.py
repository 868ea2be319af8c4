import pytest
from tqdm.std import tqdm as std_tqdm

from quantcourse.progress import progress_bar, progress_mode


@pytest.mark.parametrize("mode", ["plain", "off"])
def test_plain_and_off_give_text_bars_never_widgets(monkeypatch, mode):
    monkeypatch.setenv("QUANTCOURSE_PROGRESS", mode)
    bar = progress_bar(range(3), desc="x")
    assert type(bar) is std_tqdm  # not tqdm.notebook's widget class
    assert bar.disable is (mode == "off")
    assert list(bar) == [0, 1, 2]


def test_disable_wins_in_every_mode(monkeypatch):
    monkeypatch.setenv("QUANTCOURSE_PROGRESS", "plain")
    assert progress_bar(range(2), disable=True).disable


def test_unset_means_auto(monkeypatch):
    monkeypatch.delenv("QUANTCOURSE_PROGRESS", raising=False)
    assert progress_mode() == "auto"


def test_unknown_mode_names_the_choices(monkeypatch):
    monkeypatch.setenv("QUANTCOURSE_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="auto, plain, off"):
        progress_bar(range(2))
