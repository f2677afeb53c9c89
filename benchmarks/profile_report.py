#!/usr/bin/env python
"""Summarise py-spy "raw" (collapsed stacks) output: top functions by self and by inclusive share.

python benchmarks/run.py --events 20000 --only service --profile py-spy --out /tmp/prof
python benchmarks/profile_report.py /tmp/prof/profile-kameleoon.txt [--top 25] [--filter consumer/]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/consumer/", "/lib/python3"):
        if marker in path:
            path = path[path.index(marker) + (0 if marker == "/consumer/" else len(marker)) :].lstrip("/")
            break
    return f"{m.group('fn')} ({path})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--filter", default="", help="only list functions whose file contains this")
    args = ap.parse_args()
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    idle = 0
    for line in open(args.file):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = [short(f) for f in stack.split(";")]
        if frames and (
            "select (selectors.py" in frames[-1]
            or "poll (selectors.py" in frames[-1]
            or frames[-1].startswith("select (")
            or frames[-1].startswith("epoll")
        ):
            idle += count
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    print(f"{total} samples; idle in the event loop's select/epoll: {100 * idle / max(total, 1):.1f}%\n")
    print("self time:")
    for f, n in own.most_common():
        if args.filter and args.filter not in f:
            continue
        print(f"  {100 * n / total:5.1f}%  {f}")
        args.top -= 1
        if args.top <= 0:
            break
    print("\ninclusive (consumer/ functions):")
    shown = 0
    for f, n in incl.most_common():
        if "consumer/" not in f and "(" in f:
            continue
        print(f"  {100 * n / total:5.1f}%  {f}")
        shown += 1
        if shown >= 30:
            break


if __name__ == "__main__":
    main()
