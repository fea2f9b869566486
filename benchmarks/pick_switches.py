"""Which of the Gluon twin's A/B switches won ``kernels.py --sm90``'s interleaved rounds: the
environment that turns the winners on, for a second ``kernels.py --sm90`` run whose engine rows
(and ``benchmarks/targets.py``'s verdict) then use them.

    python benchmarks/pick_switches.py benchmarks/results/kernels-sm90-<device>-<date>.json [--margin 0.01]

Reads the JSON's ``interleaved`` pairs that carry ``env`` (the ``GDQ_SM90_*`` variables that make
the engine launch the pair's row as that row: ``regs``, ``late``, ``res2``), groups them by their
``env`` (one switch's rows: signed codes through registers is timed on conv1 at a8 and a4 and on
conv2 + next codes at a4) and takes a group when the median of its pairs' median ratios is below
``1 - margin`` and none of those ratios is above ``1 + margin``: faster, and slower nowhere. Groups
setting any of the same variables (the residual boxes' three; two pairs a program, alone and with
two residual boxes) are alternatives: the lowest median wins.
Prints the chosen assignments on one line (``VAR=VALUE ...``; an empty line when none won), and
each group's verdict on stderr. Exits 0; 2 when the JSON has no interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def pick(pairs: list[dict], margin: float) -> tuple[dict[str, str], list[str]]:
    """(the winning groups' variables, one report line per group) for the ``interleaved`` ``pairs``
    of a kernels JSON (those without ``env`` are issue 4's a4 / a2 pairs, not switches)."""
    groups: dict[tuple, list[float]] = {}
    for p in pairs:
        if p.get("env"):
            groups.setdefault(tuple(sorted(p["env"].items())), []).append(p["median_ratio"])
    winners = []  # (median, the group) of the groups faster everywhere
    lines = []
    for env, ratios in groups.items():
        median = statistics.median(ratios)
        wins = median < 1 - margin and max(ratios) <= 1 + margin
        names = " ".join(f"{k}={v}" for k, v in env)
        lines.append(f"{names}: median {median:.3f} of {len(ratios)} pair(s) (worst {max(ratios):.3f})"
                     f"  {'faster' if wins else 'not taken'}")
        if wins:
            winners.append((median, env))
    chosen: dict[str, str] = {}
    for _, env in sorted(winners):  # fastest first; a group setting a variable already set is an alternative
        if not any(k in chosen for k, _ in env):
            chosen.update(env)
    return chosen, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", type=Path, help="a kernels-sm90-*.json written by benchmarks/kernels.py --sm90")
    p.add_argument("--margin", type=float, default=0.01,
                   help="how much faster (a fraction) a switch's rows must be, and how much slower none may be")
    args = p.parse_args(argv)
    rounds = json.loads(args.json.read_text()).get("interleaved")
    if not rounds:
        print(f"{args.json}: no interleaved rounds (a kernels.py --sm90 JSON from after the twelfth run)",
              file=sys.stderr)
        return 2
    chosen, lines = pick(rounds["pairs"], args.margin)
    print("\n".join(lines), file=sys.stderr)
    print(" ".join(f"{k}={v}" for k, v in sorted(chosen.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
