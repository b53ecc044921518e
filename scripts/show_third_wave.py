"""Figures and a power summary for the third-wave harness cards (issue #22): GBNN, Virgo, the policy-gradient noise
mask, XOR-cluster grokking, gradient coherence with robust-mean GD, and benign oscillation.

    python scripts/show_third_wave.py --results docs/harness_results.jsonl --out-dir docs

Reads the results file that ``diffkit harness run`` appends to and writes ``third_wave.png`` (one panel per card)
and ``third_wave.md``: for every method against its card's baseline and every metric, the paired mean difference
with its 95 % t-interval, the smallest paired difference the seeds could detect (95 % confidence, 80 % power, from
the observed spread of the differences) and a verdict: "significant" when the interval excludes 0, otherwise
"inconclusive" when the detectable difference exceeds the effect of interest listed below for that metric, else
"no difference as large as" that effect.
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffkit.bench import markdown_table  # noqa: E402
from diffkit.harness.report import detectable_difference, mean_std, paired_interval, read_results  # noqa: E402
from diffkit.images import save_figure_atomic, write_text_atomic  # noqa: E402


CARDS = ("gbnn", "virgo_depth2", "virgo_depth4", "virgo_depth8", "pgnm", "xor_grokking", "coherence_labels",
         "robust_mean_gd", "benign_oscillation")
# differences we would call meaningful at this scale (our choice, stated in the output; the papers' own effect sizes
# on these data do not exist): accuracy points, coherence units, fractions of examples
EFFECTS = {
    "gbnn": {"test_accuracy": 0.01, "units25_test_accuracy": 0.05, "units50_test_accuracy": 0.05,
             "units75_test_accuracy": 0.02},
    "virgo_depth2": {"test_accuracy": 0.01}, "virgo_depth4": {"test_accuracy": 0.01},
    "virgo_depth8": {"test_accuracy": 0.01},
    "pgnm": {"test_accuracy": 0.005, "probe_accuracy": 0.03},
    "xor_grokking": {"test_accuracy": 0.1, "test_accuracy_step1": 0.1},
    "coherence_labels": {"coherence_early": 0.5},
    "robust_mean_gd": {"noisy_train_fit": 0.05, "clean_train_fit": 0.05, "test_accuracy": 0.02},
    "benign_oscillation": {"weak_test_accuracy": 0.05, "max_cos_weak": 0.1},
}


def _verdict(diffs: list[float], effect: float | None) -> list[str]:
    if len(diffs) < 2:
        return ["–", "–", "–"]
    mean, lo, hi = paired_interval(diffs)
    detectable = detectable_difference(mean_std(diffs)[1], len(diffs))
    if lo > 0 or hi < 0:
        verdict = "significant"
    elif effect is None:
        verdict = "no significant difference"
    elif detectable > effect:
        verdict = f"inconclusive (effect of interest {effect:g})"
    else:
        verdict = f"no difference as large as {effect:g}"
    return [f"{mean:+.4g} [{lo:+.4g}, {hi:+.4g}]", f"{detectable:.3g}", verdict]


def power_table(card: str, records: list[dict]) -> str:
    by = defaultdict(dict)
    for r in records:
        by[r["method"]][r["seed"]] = r
    baseline = records[0]["baseline"]
    metrics = list(dict.fromkeys(k for r in records for k in r["metrics"]))
    rows = []
    for method in sorted(m for m in by if m != baseline):
        seeds = sorted(set(by[method]) & set(by[baseline]))
        for k in metrics:
            diffs = [by[method][s]["metrics"][k] - by[baseline][s]["metrics"][k] for s in seeds
                     if k in by[method][s]["metrics"] and k in by[baseline][s]["metrics"]]
            if diffs:
                means = [mean_std([by[m][s]["metrics"][k] for s in seeds if k in by[m][s]["metrics"]])
                         for m in (baseline, method)]
                rows.append([method, k, len(diffs), f"{means[0][0]:.4g} ± {means[0][1]:.2g}",
                             f"{means[1][0]:.4g} ± {means[1][1]:.2g}",
                             *_verdict(diffs, EFFECTS.get(card, {}).get(k))])
    header = ["method", "metric", "seeds", f"{baseline} (baseline)", "method", "Δ mean [95 % CI]", "detectable Δ",
              "verdict"]
    return f"## {card}\n\n" + markdown_table(header, rows)


def _curve_mean(records, name):
    """Mean and std over seeds of a stored curve, on the steps every seed recorded."""
    curves = [dict((row[0], row[-1]) for row in r["curves"][name]) for r in records if r.get("curves", {}).get(name)]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    stats = [mean_std([c[s] for c in curves]) for s in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def draw(by_card: dict) -> plt.Figure:
    fig, axes = plt.subplots(3, 3, figsize=(15, 12.5))
    axes = axes.ravel()
    methods = lambda card: sorted({r["method"] for r in by_card[card]})  # noqa: E731
    runs = lambda card, m: [r for r in by_card[card] if r["method"] == m]  # noqa: E731

    ax = axes[0]  # XOR grokking: clean test accuracy against GD steps
    if "xor_grokking" in by_card:
        for m in methods("xor_grokking"):
            steps, mean, std = _curve_mean(runs("xor_grokking", m), "test_accuracy")
            ax.plot(steps, mean, label=f"{m} test")
            ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], alpha=0.2)
        steps, mean, _ = _curve_mean(runs("xor_grokking", "gd_lr0.2"), "flipped_fit")
        ax.plot(steps, mean, "k--", label="gd_lr0.2 flipped labels fitted")
        ax.set(xscale="log", xlabel="GD step", ylabel="accuracy", title="XOR clusters: benign overfitting (10 seeds)")
        ax.legend(fontsize=7)

    ax = axes[1]  # coherence against steps
    if "coherence_labels" in by_card:
        for m in methods("coherence_labels"):
            steps, mean, std = _curve_mean(runs("coherence_labels", m), "coherence")
            ax.plot(steps, mean, label=m)
            ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], alpha=0.2)
        ax.axhline(1, color="grey", lw=0.5)
        ax.set(xlabel="SGD step", ylabel="m-coherence (m = 256)", title="gradient coherence, digits MLP (5 seeds)")
        ax.legend(fontsize=7)

    ax = axes[2]  # robust-mean GD: noisy-label fit against clean-label fit
    if "robust_mean_gd" in by_card:
        for m in methods("robust_mean_gd"):
            rs = runs("robust_mean_gd", m)
            ax.scatter([r["metrics"]["clean_train_fit"] for r in rs], [r["metrics"]["noisy_train_fit"] for r in rs],
                       label=m, s=18)
        ax.set(xlabel="fit of correctly labelled training examples", ylabel="fit of mislabelled examples (memorised)",
               title="robust-mean GD, 40 % label noise (5 seeds)")
        ax.legend(fontsize=7)

    ax = axes[3]  # benign oscillation: training-loss trajectories of the lowest seed
    if "benign_oscillation" in by_card:
        for m in methods("benign_oscillation"):
            r = min(runs("benign_oscillation", m), key=lambda r: r["seed"])
            steps, values = zip(*[(row[0], row[-1]) for row in r["curves"]["train_loss"]])
            ax.plot(steps, [max(v, 1e-6) for v in values], label=f"{m} (weak-only acc {r['metrics']['weak_test_accuracy']:.2f})",
                    lw=0.8)
        ax.set(yscale="log", xlabel="SGD step", ylabel="training loss",
               title=f"benign oscillation (seed {r['seed']})")
        ax.legend(fontsize=7)

    ax = axes[4]  # benign oscillation: weak-only accuracy and alignment with u per learning rate
    if "benign_oscillation" in by_card:
        ms = methods("benign_oscillation")
        for i, (k, label) in enumerate((("weak_test_accuracy", "weak-feature-only test accuracy"),
                                        ("max_cos_weak", "max cos(w, u)"))):
            stats = [mean_std([r["metrics"][k] for r in runs("benign_oscillation", m)]) for m in ms]
            ax.bar([j + 0.4 * i for j in range(len(ms))], [s[0] for s in stats], 0.4, yerr=[s[1] for s in stats],
                   label=label)
        ax.set_xticks([j + 0.2 for j in range(len(ms))], ms, fontsize=7)
        ax.set(title="benign oscillation: weak feature learned (5 seeds)")
        ax.legend(fontsize=7)

    ax = axes[5]  # GBNN: accuracy against the share of hidden units kept
    if "gbnn" in by_card:
        for m in methods("gbnn"):
            keys = ["units25_test_accuracy", "units50_test_accuracy", "units75_test_accuracy", "test_accuracy"]
            stats = [mean_std([r["metrics"][k] for r in runs("gbnn", m)]) for k in keys]
            ax.errorbar([25, 50, 75, 100], [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", label=m,
                        capsize=3)
        ax.set(xlabel="% of 200 hidden units kept (GBNN: first trained; MLP: random)", ylabel="test accuracy",
               title="GBNN vs backprop MLPs, digits (5 seeds)")
        ax.legend(fontsize=7)

    ax = axes[6]  # Virgo: accuracy against depth
    depths = [d for d in (2, 4, 8) if f"virgo_depth{d}" in by_card]
    if depths:
        for m in methods(f"virgo_depth{depths[0]}"):
            stats = [mean_std([r["metrics"]["test_accuracy"] for r in runs(f"virgo_depth{d}", m)]) for d in depths]
            ax.errorbar(depths, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", label=m, capsize=3)
        ax.set(xticks=depths, xlabel="GCN layers", ylabel="test accuracy",
               title="GNN initialisers, kNN digits graph (5 seeds)")
        ax.legend(fontsize=7)

    ax = axes[7]  # Virgo: variance spread at initialisation against depth
    if depths:
        for i, m in enumerate(methods(f"virgo_depth{depths[0]}")):
            for key, style in (("backward_variance_spread", "-"), ("forward_variance_spread", "--")):
                stats = [mean_std([r["metrics"][key] for r in runs(f"virgo_depth{d}", m)]) for d in depths]
                ax.plot(depths, [s[0] for s in stats], style, marker="o", color=f"C{i}",
                        label=m if style == "-" else None)
        ax.set(xticks=depths, xlabel="GCN layers", ylabel="log10(max / min layer variance)",
               title="variance spread at init: gradients (solid), outputs (dashed)")
        ax.legend(fontsize=7)

    ax = axes[8]  # PGNM: clean accuracy after fine-tuning and the unseen-class probe
    if "pgnm" in by_card:
        ms = methods("pgnm")
        for i, k in enumerate(("test_accuracy", "probe_accuracy")):
            stats = [mean_std([r["metrics"][k] for r in runs("pgnm", m)]) for m in ms]
            ax.bar([j + 0.4 * i for j in range(len(ms))], [s[0] for s in stats], 0.4, yerr=[s[1] for s in stats],
                   label=k)
        ax.set_xticks([j + 0.2 for j in range(len(ms))], ms, fontsize=6, rotation=15)
        ax.set(ylim=(0.6, 1.0), title="noise-mask pre-training (5 seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="docs/harness_results.jsonl")
    parser.add_argument("--out-dir", default="docs")
    args = parser.parse_args(argv)
    try:
        records = read_results(args.results)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    by_card = defaultdict(list)
    for r in records:
        if r["card"] in CARDS:
            by_card[r["card"]].append(r)
    if not by_card:
        print(f"error: {args.results} has no records of the cards {', '.join(CARDS)}", file=sys.stderr)
        return 1
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = ["# Third-wave harness cards: paired differences and power", "",
            f"Generated by `python scripts/show_third_wave.py` from `{Path(args.results).name}`. Each row: a method "
            "against its card's baseline on the same seeds; detectable Δ = the smallest mean paired difference the "
            "seeds could detect (two-sided paired t-test, 95 % confidence, 80 % power, from the observed spread of "
            "the differences). Effects of interest (our choice of a difference that would matter at this scale): "
            + "; ".join(f"{c}: " + ", ".join(f"{k} {v:g}" for k, v in e.items()) for c, e in EFFECTS.items()) + ".",
            ""]
    text += [power_table(card, by_card[card]) for card in CARDS if card in by_card]
    write_text_atomic(out / "third_wave.md", "\n".join(text))
    save_figure_atomic(draw(by_card), out / "third_wave.png")
    print("\n".join(text))
    print(f"wrote {out / 'third_wave.md'} and {out / 'third_wave.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
