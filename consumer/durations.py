"""Durations as a person reads them: 2595600000 ms is "30 days 1 h", 1500 ms is "1.5 s"."""

from __future__ import annotations

_UNITS = ((86_400_000, "day"), (3_600_000, "h"), (60_000, "min"))


def human(ms: int) -> str:
    """Exact, largest unit first, zero parts left out: "7 days 0.001 s", "5 min", "250 ms", "-2 h", "0 s"."""
    if ms < 0:
        return "-" + human(-ms)
    if ms == 0:
        return "0 s"
    parts: list[str] = []
    rest = ms
    for size, name in _UNITS:
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n} {name}s" if name == "day" and n != 1 else f"{n} {name}")
    if rest:
        seconds, millis = divmod(rest, 1000)
        if not parts and not seconds:
            parts.append(f"{millis} ms")
        else:
            # Every millisecond kept: the text is exact, so a rejection's numbers never look equal.
            parts.append(f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") + " s")
    return " ".join(parts)
