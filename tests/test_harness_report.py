"""The report's power: the smallest detectable paired difference against its closed-form limit and a Monte Carlo
of the paired t-test it describes, and the "inconclusive" verdict where the paper's effect is smaller than that."""

import json
import math

import numpy as np
import pytest
from scipy.stats import norm, t as student_t

from diffkit.harness.report import detectable_difference, write_report


def test_detectable_difference_tends_to_the_normal_closed_form():
    # n -> infinity: (z_0.975 + z_0.8) s / sqrt(n) = 2.8016 s / sqrt(n)
    s, n = 0.7, 20_000
    closed = (norm.ppf(0.975) + norm.ppf(0.8)) * s / math.sqrt(n)
    assert detectable_difference(s, n) == pytest.approx(closed, rel=2e-4)
    # small n: above the t-quantile approximation's (t_0.975 + t_0.8) s / sqrt(n) only slightly, far above the normal
    for n in (3, 5, 10):
        approx = (student_t.ppf(0.975, n - 1) + student_t.ppf(0.8, n - 1)) * s / math.sqrt(n)
        assert approx * 0.97 < detectable_difference(s, n) < approx * 1.1
    assert detectable_difference(0.0, 5) == 0.0
    assert detectable_difference(2 * s, 7) == pytest.approx(2 * detectable_difference(s, 7))


@pytest.mark.parametrize("n", [3, 6, 12])
def test_a_paired_t_test_detects_that_difference_80_percent_of_the_time(n):
    s = 1.0
    delta = detectable_difference(s, n)
    rng = np.random.default_rng(n)
    d = rng.normal(delta, s, size=(200_000, n))
    tstat = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    power = (np.abs(tstat) > student_t.ppf(0.975, n - 1)).mean()
    assert power == pytest.approx(0.8, abs=0.005)


def test_detectable_difference_refuses_bad_input():
    with pytest.raises(ValueError, match="n must be an int >= 2"):
        detectable_difference(1.0, 1)
    with pytest.raises(ValueError, match="std must be a finite number >= 0"):
        detectable_difference(float("nan"), 4)
    with pytest.raises(ValueError, match="power must be in"):
        detectable_difference(1.0, 4, power=1.0)


def _record(method, seed, value, effect=None):
    return {"card": "c", "method": method, "seed": seed, "metrics": {"acc": value}, "wall_s": 1.0, "baseline": "base",
            "metric": "acc", "paper": "p", "expected": "e", "paper_effect": effect}


def test_report_says_inconclusive_when_the_seeds_cannot_detect_the_papers_effect(tmp_path):
    base, new = [0.50, 0.60, 0.70, 0.65], [0.55, 0.55, 0.75, 0.60]  # differences +-0.05: interval contains 0
    diffs = [b - a for a, b in zip(base, new)]
    detectable = detectable_difference(float(np.std(diffs, ddof=1)), 4)
    results = tmp_path / "r.jsonl"
    for effect, verdict in ((None, "not significant** (no paper effect"), ({"acc": detectable / 2}, "inconclusive"),
                            ({"acc": detectable * 2}, "no significant difference")):
        records = [_record("base", s, v, effect) for s, v in enumerate(base)]
        records += [_record("new", s, v, effect) for s, v in enumerate(new)]
        results.write_text("".join(json.dumps(r) + "\n" for r in records))
        text = write_report(results, tmp_path / "r.md")
        row = next(line for line in text.splitlines() if line.startswith("| new |") and "[" in line)
        assert f"±{detectable:.4g}" in row and verdict in row
        assert ("inconclusive" in row) == (verdict == "inconclusive")
        assert ("no significant difference" in row) == (verdict == "no significant difference")
        if effect:
            assert f"Paper's effect: acc {effect['acc']:.4g}" in text
    assert "80 % power" in text and "noncentral t" in text


def test_a_records_note_is_shown_once_under_its_card(tmp_path):
    note = "run with the card's settings before #20; not rerun"
    records = [{**_record(m, s, 0.5 + 0.01 * s), "note": note} for m in ("base", "new") for s in range(3)]
    records += [_record(m, s, 0.5, None) | {"card": "d"} for m in ("base", "new") for s in range(2)]
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report(results, tmp_path / "r.md")
    assert text.count(note) == 1
    assert text.index("## c") < text.index(note) < text.index("| method |") < text.index("## d")
