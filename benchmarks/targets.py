"""Issue 4's kernel targets, checked on a ``kernels.py --sm90`` JSON: every a8 conv the engine runs
(rows with ``"engine": true``) at >= 1.6x cuDNN's fp16 conv of the same shape and >= 70% of its
floor, and its a4 / a2 convs (codes one per byte, ``... bytes`` rows) no slower than the a8 conv
of the same kind, within ``--tolerance`` (default 2%: the body convs' rows moved at most 0.55%
between the eleventh H100 run's two processes, ``kernels-sm90-...-run11-{second,third}.json``).
Where the JSON has ``interleaved`` rounds (kernels.py since the twelfth run), a narrow row's ratio
is the median of its rounds' ratios to the a8 row, each round timing both seconds apart; the
single-pass ratio of the rows is printed beside it.

    python benchmarks/targets.py benchmarks/results/kernels-sm90-<device>-<date>.json

Prints one line per engine row and a verdict; exits 0 when every target holds, 1 when one does
not, 2 when the file has no engine rows (JSONs written before the field; older runs' rows can be
read by hand: README "Speed", docs/speed-history.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPEEDUP_TARGET = 1.6  # x cuDNN fp16, a8
FLOOR_TARGET = 70.0  # % of the floor, a8


def base_kind(conv: str) -> str:
    """The a8 row a narrow-code row is held against: ``conv1 bytes sm90 ...`` -> ``conv1 sm90 ...``
    (the same conv and settings, 8-bit codes)."""
    return conv.replace(" bytes", "", 1)


def row_key(row: dict) -> str:
    """A row's name in a kernels JSON's ``interleaved`` rounds, as kernels.py writes them: its conv and
    activation bits (the a4 and a2 rows share a conv name)."""
    return f"{row['conv']} a{row['a_bits']}"


def check(rows: list[dict], tolerance: float, interleaved: dict | None = None) -> tuple[list[str], bool]:
    """Report lines and whether every target holds, for ``rows`` (a kernels JSON's ``rows``;
    those with ``engine`` true count) and its ``interleaved`` rounds (None: none; a narrow row's
    pair there with its a8 row gives its ratio). Raises ValueError when none has ``engine``."""
    engine = [r for r in rows if r.get("engine")]
    if not engine:
        raise ValueError("no rows with \"engine\": true (a kernels.py --sm90 JSON from after the eleventh H100 run)")
    a8 = {r["conv"]: r for r in engine if r["a_bits"] == 8}
    lines, ok = [], True
    for r in engine:
        head = f"{r['conv']:64} a{r['a_bits']} {r['us']:7.1f} us"
        if r["a_bits"] == 8:
            good = r["speedup_vs_fp16"] >= SPEEDUP_TARGET and r["pct_of_floor"] >= FLOOR_TARGET
            lines.append(f"{head}  {r['speedup_vs_fp16']:.2f}x fp16 (>= {SPEEDUP_TARGET})  "
                         f"{r['pct_of_floor']:.1f}% of floor (>= {FLOOR_TARGET:.0f})  {'met' if good else 'MISSED'}")
        else:
            ref = a8.get(base_kind(r["conv"]))
            if ref is None:
                lines.append(f"{head}  no a8 row {base_kind(r['conv'])!r} to compare with  MISSED")
                ok = False
                continue
            ratio = single = r["us"] / ref["us"]
            how = ""
            paired = [p for p in (interleaved or {}).get("pairs", [])
                      if (p["row"], p["against"]) == (row_key(r), row_key(ref))]
            if paired:
                ratio = paired[0]["median_ratio"]
                how = f", median of {len(paired[0]['ratios'])} interleaved rounds (single pass {single:.3f}x)"
            good = ratio <= 1 + tolerance
            lines.append(f"{head}  {ratio:.3f}x the a8 row's time (<= {1 + tolerance:.2f}){how}  "
                         f"{'met' if good else 'MISSED'}")
        ok &= good
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", type=Path, help="a kernels-sm90-*.json written by benchmarks/kernels.py --sm90")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="how much slower (a fraction) an a4 / a2 row may be than its a8 row and count as no slower")
    args = p.parse_args(argv)
    data = json.loads(args.json.read_text())
    try:
        lines, ok = check(data["rows"], args.tolerance, data.get("interleaved"))
    except ValueError as e:
        print(f"{args.json}: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"issue 4's targets: {'all met' if ok else 'NOT all met'} "
          f"({data.get('environment', {}).get('gpu', 'unknown GPU')}, {args.json.name})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
