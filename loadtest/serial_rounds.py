"""The serial-latency floor over several rounds: added latency of the proxy / of HAProxy.

One serial run (c=1, m=1) moves 10-30 % on this shared machine, HAProxy's as much as ours, so
a single ratio says little. This runs ``loadtest.bench``'s serial scenario (direct, HAProxy,
the proxy, side by side) ``--rounds`` times and prints each round's ratio of *added* latency
(mean minus direct's mean) and their median.

    python -m loadtest.serial_rounds --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtest import bench, tools


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.serial_rounds", description=__doc__)
    parser.add_argument("--rounds", type=tools.positive_int, default=5, help="rounds (default 5)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--proxy-cmd", default=bench.DEFAULT_PROXY_CMD)
    parser.add_argument(
        "--out",
        type=Path,
        default=tools.LOADTEST / "out" / "serial-rounds",
        help="where each round's bench results and logs go (default %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    ratios: list[float] = []
    print("round  direct  HAProxy  proxy   added: HAProxy  proxy  ratio", flush=True)
    for n in range(1, args.rounds + 1):
        with contextlib.redirect_stdout(io.StringIO()):  # its table: we print our own
            code = bench.main(
                [
                    "--only=direct,haproxy,proxy",
                    "--scenarios=serial",
                    f"--duration={args.duration:g}",
                    f"--proxy-cmd={args.proxy_cmd}",
                    f"--out={out}",
                ]
            )
        if code != 0:
            print(f"round {n}: the bench exited {code}", file=sys.stderr)
            return code
        rows = json.loads((out / "results.json").read_text())["results"]
        mean = {row["target"]: row["mean_us"] for row in rows if row["status"] == "ok"}
        if set(mean) != {"direct", "haproxy", "proxy"}:
            print(f"round {n}: missing results: {sorted(mean)}", file=sys.stderr)
            return 1
        added_haproxy = mean["haproxy"] - mean["direct"]
        added_proxy = mean["proxy"] - mean["direct"]
        ratios.append(added_proxy / added_haproxy)
        print(
            f"{n:5}  {mean['direct']:6.0f}  {mean['haproxy']:7.0f}  {mean['proxy']:5.0f}"
            f"   {added_haproxy:14.0f}  {added_proxy:5.0f}  {ratios[-1]:5.2f}",
            flush=True,
        )
    print(
        f"added-latency ratio proxy/HAProxy: median {statistics.median(ratios):.2f}, "
        f"min {min(ratios):.2f}, max {max(ratios):.2f} over {len(ratios)} rounds "
        f"({sum(r <= 1.5 for r in ratios)} at or under 1.5)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
