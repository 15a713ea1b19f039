"""A sweep sized to a time budget: parsing it, ASHA's arithmetic as Ray runs it, the sweep's
time on its slots, the plan and its sentences, and its revision as trials end.

Pure arithmetic on injected costs: no Ray, no training, no clock.
"""

from __future__ import annotations

import pytest

from tlray import config
from tlray.config.interval import Every, format_span, parse_budget, parse_every
from tlray.errors import TlrayError


# --- parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("2m", 120), ("20m", 1200), ("1h30m", 5400), ("4h", 14400), ("90", 90),
    (90, 90), ("1m30s", 90), ("10 min", 600), (" 2M ", 120)])
def test_a_budget_is_read_in_the_forms_people_write(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", [None, "", "none"])
def test_no_budget(text):
    assert parse_budget(text) is None


@pytest.mark.parametrize("text", ["soon", "0", "0s", "-5", "2x", "h", "30m1h", "1h 30"])
def test_a_bad_budget_names_the_option_and_the_forms(text):
    with pytest.raises(TlrayError, match=r"--tune\.budget: expected .*90s.*1h30m.*4h"):
        parse_budget(text)


def test_a_bad_budget_fails_when_the_config_is_resolved_before_ray_starts():
    with pytest.raises(TlrayError, match=r"--tune\.budget"):
        config.load(None, ["--tune.budget=soon"])
    assert config.load(None, ["--tune.budget=1h30m"]).tune.budget == "1h30m"
    assert config.load(None, ["--tune.budget=90"]).tune.budget == "90"  # YAML read an int


def test_checkpoint_every_shares_the_span_parser():
    assert parse_every("10m") == Every(seconds=600)
    assert parse_every("1h") == Every(seconds=3600)
    assert parse_every("200") == Every(steps=200)
    with pytest.raises(TlrayError, match="whole number"):
        parse_every("2.5")


@pytest.mark.parametrize("seconds, text", [(120, "2m"), (5400, "1h30m"), (90, "1m30s"),
                                           (50, "50s")])
def test_spans_are_written_in_the_form_they_are_read(seconds, text):
    assert format_span(seconds) == text and parse_budget(text) == seconds
