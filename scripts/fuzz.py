"""Fuzz the parsers a peer or an HTTP client can reach; exit 1 on any crash.

    .venv/bin/python scripts/fuzz.py [--count 100000] [--seed 1] [--target all]
    .venv/bin/python scripts/fuzz.py --target session --seed 1 --only 4711   # replay one input

Targets (``tests/fuzzgen.py`` has the generators and what counts as a crash):
``dcf`` (FrameDecoder), ``messages`` (decode_payload), ``rpc`` (HostRewriter,
WorkerExpander), ``http`` (the OpenAI validation, serve_openai and the real
gateway app over loopback) and ``session`` (PeerSession: datagrams, handshake
frames, control frames and streams from a hostile peer). ``--count`` is per
target; input ``i`` depends only on the target, ``--seed`` and ``i``.

For each target it prints how many inputs ran, how many were accepted, how
many refused with the API's declared error, and how many crashed, then the
first crash reports. The test suite runs the same generators with a smaller
count (tests/test_fuzz.py). See docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fuzzgen  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", choices=[*fuzzgen.TARGETS, "all"], default="all")
    parser.add_argument("--start", type=int, default=0, help="index of the first input")
    parser.add_argument("--only", type=int, default=None, metavar="INDEX",
                        help="run just this input (with --target) and show what happened")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    targets = fuzzgen.TARGETS if args.target == "all" else (args.target,)
    if args.only is not None:
        if args.target == "all":
            parser.error("--only needs --target")
        args.start, args.count = args.only, 1

    def progress(tally: fuzzgen.Tally) -> None:
        print(f"  ... {tally.line()}", file=sys.stderr, flush=True)

    print(f"fuzz: seed {args.seed}, {args.count} inputs per target from #{args.start}",
          flush=True)
    began = time.perf_counter()
    tallies = []
    for name in targets:
        tally = fuzzgen.run_target(name, args.count, args.seed, start=args.start,
                                   progress=None if args.quiet else progress)
        tallies.append(tally)
        print(tally.line(), flush=True)
        if len(tally.modes) > 1:
            for mode, outcomes in tally.modes.items():
                print(f"    {mode:<38} accepted {outcomes.get('accepted', 0):>7}  "
                      f"refused {outcomes.get('refused', 0):>7}", flush=True)
        for what, n in tally.notes.items():
            print(f"    refused, noted: {what} ({n}x)", flush=True)
    total = sum(t.inputs for t in tallies)
    crashes = sum(t.crashes for t in tallies)
    print(f"total     inputs {total:>7}  crashes {crashes}  in {time.perf_counter() - began:.1f} s")
    for tally in tallies:
        for report in tally.failures:
            print(f"\nCRASH {report}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
