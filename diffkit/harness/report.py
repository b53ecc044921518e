"""Aggregate harness results (one JSON line per run) into markdown: per card, mean +- std over seeds per method
and metric, and the paired difference of each method to the baseline with a 95 % t-interval over the seeds both
ran, beside the smallest paired difference those seeds could detect (``detectable_difference``: 95 % confidence,
80 % power, from the observed spread of the differences). An interval that contains 0 is "no significant difference"
only where the seeds could have detected the paper's effect (the card's ``paper_effect`` for that metric);
where the detectable difference is larger than the paper's effect the row says "inconclusive", and where the card
states no effect it says "not significant" with no claim about power (±d is then the only guide)."""

import json
import math
from collections import defaultdict
from pathlib import Path

from ..images import write_text_atomic


def read_results(path: str | Path) -> list[dict]:
    """The records of a results file; a later record for the same (card, method, seed) replaces an earlier one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    latest = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (record["card"], record["method"], record["seed"])
            record["metrics"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number} is not a harness result record ({err})") from None
        latest[key] = record
    return list(latest.values())


def append_results(path: str | Path, records: list[dict]) -> None:
    """Append records as JSON lines; the whole file is rewritten through a temporary file, so a crash never leaves
    a half-written line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text_atomic(path, old + "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def paired_interval(diffs: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean paired difference and its two-sided Student-t confidence interval, mean +- t_{n-1} s / sqrt(n)."""
    from scipy.stats import t

    if len(diffs) < 2:
        raise ValueError(f"a t-interval needs at least 2 paired differences, got {len(diffs)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    mean, std = mean_std(diffs)
    half = t.ppf(0.5 + confidence / 2, len(diffs) - 1) * std / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


POWER = 0.8


def detectable_difference(std: float, n: int, confidence: float = 0.95, power: float = POWER) -> float:
    """The smallest true mean paired difference that a two-sided paired t-test at level 1 - ``confidence`` finds
    with probability ``power`` from ``n`` pairs whose differences have sample standard deviation ``std``:
    delta = lambda std / sqrt(n), lambda the noncentrality at which the noncentral t (n - 1 degrees of freedom)
    exceeds the critical value +-t_{1 - alpha/2, n-1} with probability ``power``. For large n this tends to
    (z_{1 - alpha/2} + z_{power}) std / sqrt(n) = 2.80 std / sqrt(n) at 95 % and 80 %."""
    from scipy.optimize import brentq
    from scipy.stats import nct, t

    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"n must be an int >= 2 (pairs), got {n!r}")
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    for name, value in (("confidence", confidence), ("power", power)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    df = n - 1
    critical = t.ppf(0.5 + confidence / 2, df)

    def shortfall(ncp):  # P(|T| > critical | noncentrality ncp) - power; P(T < -c | ncp) = P(T > c | -ncp)
        lower = nct.sf(critical, df, -ncp)
        return nct.sf(critical, df, ncp) + (0.0 if math.isnan(lower) else lower) - power

    upper = critical + 10.0
    while shortfall(upper) < 0:
        upper *= 2
    return brentq(shortfall, 0.0, upper, xtol=1e-10) * std / math.sqrt(n)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def card_table(records: list[dict]) -> str:
    """Markdown for one card's records."""
    first = records[0]
    card, baseline, primary = first["card"], first["baseline"], first["metric"]
    metrics = list(dict.fromkeys(k for r in records for k in r["metrics"]))
    metrics.sort(key=lambda k: k != primary)  # the card's headline metric first
    by_method = defaultdict(dict)
    for r in records:
        by_method[r["method"]][r["seed"]] = r
    methods = sorted(by_method, key=lambda m: (m != baseline, m))
    lines = [f"## {card}", "", f"Paper: {first['paper']}", "", f"Expected: {first['expected']}", ""]
    # a record's note says how to read it, e.g. that it predates a change of its card and was not rerun
    lines += [f"**Note:** {note}\n" for note in dict.fromkeys(r["note"] for r in records if r.get("note"))]
    lines += ["| method | seeds | " + " | ".join(metrics) + " | wall s / run |",
              "|---" * (len(metrics) + 3) + "|"]
    for m in methods:
        runs = by_method[m].values()
        cells = []
        for k in metrics:
            values = [r["metrics"][k] for r in runs if k in r["metrics"]]
            cells.append("{} ± {}".format(*map(_fmt, mean_std(values))) if values else "–")
        wall = mean_std([r["wall_s"] for r in runs])[0]
        label = f"{m} (baseline)" if m == baseline else m
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + f" | {wall:.1f} |")
    others = [m for m in methods if m != baseline]
    effects = first.get("paper_effect") or {}
    if effects:
        lines[6:6] = ["Paper's effect: " + ", ".join(f"{k} {_fmt(v)}" for k, v in effects.items()), ""]
    if others and baseline in by_method:
        lines += ["", f"Paired difference to {baseline} (same seeds), mean [95 % t-interval] and the smallest "
                  "difference those seeds could detect (95 % confidence, 80 % power):", "",
                  "| method | " + " | ".join(f"Δ {k}" for k in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for m in others:
            seeds = sorted(set(by_method[m]) & set(by_method[baseline]))
            cells = []
            for k in metrics:
                diffs = [by_method[m][s]["metrics"][k] - by_method[baseline][s]["metrics"][k] for s in seeds
                         if k in by_method[m][s]["metrics"] and k in by_method[baseline][s]["metrics"]]
                cells.append(_difference_cell(diffs, effects.get(k)))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += curve_lines(by_method, methods)
    return "\n".join(lines) + "\n"


def _curve_points(curve: list) -> list[tuple[int, float]]:
    """(step, value) pairs of a stored curve: a list of per-step values, or of rows [step, ..., value]."""
    return [(row[0], row[-1]) if isinstance(row, list) else (i, row) for i, row in enumerate(curve)]


def curve_lines(by_method: dict, methods: list[str]) -> list[str]:
    """One line per (method, curve) for the lowest seed that stored curves: the value at steps 0, 1, 2, 5, 10, 20, 50,
    ... (the last recorded point at or before each) and at the end."""
    lines = []
    for m in methods:
        seeds = [s for s in sorted(by_method[m]) if by_method[m][s].get("curves")]
        if not seeds:
            continue
        for name, curve in sorted(by_method[m][seeds[0]]["curves"].items()):
            points = _curve_points(curve)
            marks, k = [], 0
            while True:
                mark = [1, 2, 5][k % 3] * 10 ** (k // 3) if k else 0
                if mark > points[-1][0]:
                    break
                marks.append(mark)
                k += 1
            shown = {}
            for mark in marks:
                at = [p for p in points if p[0] <= mark]
                if at:
                    shown[at[-1][0]] = at[-1][1]
            shown[points[-1][0]] = points[-1][1]
            text = ", ".join(f"{step}: {_fmt(value)}" for step, value in sorted(shown.items()))
            lines.append(f"- {m} {name} (seed {seeds[0]}, step: value): {text}")
    return ["", "Curves:", ""] + lines if lines else []


def _difference_cell(diffs: list[float], effect: float | None = None) -> str:
    if len(diffs) < 2:
        return f"{_fmt(diffs[0])} (1 seed, no interval)" if diffs else "–"
    mean, lo, hi = paired_interval(diffs)
    if hi - lo <= 1e-12 * max(1.0, abs(mean)):  # deterministic runs: every seed gave the same difference (to rounding)
        return f"{_fmt(mean)} (identical on every seed)" + (" no difference" if mean == 0 else "")
    detectable = detectable_difference(mean_std(diffs)[1], len(diffs))
    verdict = ""
    if lo <= 0 <= hi:
        if effect is None:
            verdict = " **not significant** (no paper effect to judge the power by)"
        elif detectable > effect:
            verdict = f" **inconclusive** (detectable {_fmt(detectable)} > paper's {_fmt(effect)})"
        else:
            verdict = " **no significant difference**"
    return f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}] ±{_fmt(detectable)}{verdict}"


def write_report(results: str | Path, out: str | Path) -> str:
    """Write the markdown report of a results file to ``out`` (atomically) and return it."""
    records = read_results(results)
    if not records:
        raise ValueError(f"{results} holds no results")
    by_card = defaultdict(list)
    for r in records:
        by_card[r["card"]].append(r)
    header = ["# Harness results", "",
              f"Generated by `diffkit harness report` from `{Path(results).name}`: mean ± std over seeds; paired "
              "differences to the card's baseline with a 95 % Student-t interval over the seeds both methods ran, "
              "followed by ±d, the smallest true paired difference those seeds could detect: a two-sided paired "
              "t-test at 95 % confidence finds a difference d with 80 % power, d = λ s / √n with s the standard "
              "deviation of the n paired differences and λ the noncentrality at which the noncentral t with n − 1 "
              "degrees of freedom exceeds the critical value t(0.975, n − 1) in absolute value with probability 0.8 "
              "(for large n, d → 2.80 s / √n). An interval containing 0 is marked **inconclusive** where d is "
              "larger than the paper's effect (the card's `paper_effect`, shown under the card), **no "
              "significant difference** where d is smaller, and **not significant** where the card states no "
              "effect (nothing is then claimed about power).", "", ""]
    text = "\n".join(header) + "\n".join(card_table(by_card[c]) for c in sorted(by_card))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    return text
