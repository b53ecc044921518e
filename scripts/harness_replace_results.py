"""Replace the rows of rerun cards in the repository's harness results and regenerate the report.

    python scripts/harness_replace_results.py NEW.jsonl [NEW.jsonl ...] [--drop CARD ...] [--stale CARD ...]

Every card that has records in a NEW file loses all its old records in docs/harness_results.jsonl and gets the new
ones (a rerun replaces the card's rows, also for methods or seeds the new card no longer has). Each kept or new
record of a card still shipped in cards/ takes that card's current paper_effect (the size of the paper's effect is
not a result of the run, so a card that gained one reports its power against it), and each rerun record the card's
current paper and expected texts. --drop removes the rows of cards
that no longer exist (a renamed card); --stale marks the old rows of cards whose settings changed but which were not
rerun, so the report says so above their table. Then docs/harness_results.md is regenerated.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffkit.harness.cards import load_card  # noqa: E402
from diffkit.harness.report import read_results, write_report  # noqa: E402
from diffkit.images import write_text_atomic  # noqa: E402

STALE_NOTE = ("not rerun: these rows were run before issue #20 changed this card's setting, so they test the "
              "earlier setting described above, not the one the card file now holds")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new", nargs="*", type=Path, help="results files of the reruns")
    parser.add_argument("--drop", nargs="*", default=[], help="cards whose rows are removed")
    parser.add_argument("--stale", nargs="*", default=[], help="cards whose old rows were not rerun after a change")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "harness_results.jsonl")
    args = parser.parse_args(argv)

    new = [r for path in args.new for r in read_results(path)]
    rerun = {r["card"] for r in new}
    overlap = rerun & (set(args.stale) | set(args.drop))
    if overlap:
        raise ValueError(f"cards both rerun and marked stale / dropped: {sorted(overlap)}")
    old = read_results(args.results)
    unknown = (set(args.stale) | set(args.drop)) - {r["card"] for r in old}
    if unknown:
        raise ValueError(f"--stale / --drop name cards without rows in {args.results}: {sorted(unknown)}")
    kept = [r for r in old if r["card"] not in rerun | set(args.drop)]
    for r in kept:
        if r["card"] in args.stale:
            r["note"] = STALE_NOTE
    cards = {}
    for r in kept + new:
        card_file = ROOT / "cards" / f"{r['card']}.json"
        if card_file.is_file():
            card = cards.setdefault(r["card"], load_card(card_file))
            r["paper_effect"] = card.get("paper_effect", {})
            if r["card"] in rerun:  # one text per rerun card: the card's current one (it may have gained a sentence)
                r["paper"], r["expected"] = card["paper"], card["expected"]
    records = sorted(kept + new, key=lambda r: (r["card"], r["method"], r["seed"]))
    write_text_atomic(args.results, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    write_report(args.results, args.results.with_suffix(".md"))
    print(f"rerun: {sorted(rerun)}; stale: {sorted(args.stale)}; dropped: {sorted(args.drop)}; "
          f"{len(kept)} rows kept, {len(new)} new -> {args.results.with_suffix('.md')}")


if __name__ == "__main__":
    main()
