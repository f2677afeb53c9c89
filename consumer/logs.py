"""Structured logs: one JSON object per line, secrets scrubbed from every message and field."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class Redactor(logging.Filter):
    """Replaces any known secret value with *** wherever it appears in a record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = self.scrub(record.getMessage())
            record.args = None
            for k, v in list(vars(record).items()):
                if k not in _RESERVED and isinstance(v, str):
                    setattr(record, k, self.scrub(v))
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str)


def setup(level: str = "INFO", fmt: str = "json", secrets: Iterable[str] = (), stream: Any = None) -> Redactor:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"))
    redactor = Redactor(secrets)
    handler.addFilter(redactor)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return redactor


# librdkafka's note of how long a connection attempt took varies between otherwise identical lines.
_ATTEMPT = re.compile(r"\s*\(after \d+ms in state [A-Z_]+(?:, \d+ identical error\(s\) suppressed)?\)")


class KafkaLog:
    """librdkafka's log lines as records of the `rdkafka` logger (the JSON logger), one per line.

    Passed as a client's `logger` setting: confluent-kafka then serves the lines on the thread that
    polls the client, maps the syslog level to Python's (0-2 critical, 3 error, 4 warning, 5-6 info,
    7 debug) and calls `log(level, "%s [%s] %s", facility, client, text)`. With a broker down,
    librdkafka repeats the same failure many times a second: a warning or error line identical to one
    logged less than `repeat_window` seconds ago is counted instead, and the next one logged carries
    `repeated` (how many were held back). The last lines are kept so an error callback can tell that
    librdkafka has logged the same failure already.
    """

    def __init__(self, name: str = "rdkafka", *, repeat_window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logging.getLogger(name)
        self.repeat_window = repeat_window
        self._clock = clock
        self._recent: deque[str] = deque(maxlen=64)
        self._last: dict[tuple[int, str, str], tuple[float, int]] = {}  # line -> (logged at, held back since)

    def log(self, level: int, fmt: str, *args: object) -> None:
        if len(args) != 3:
            self.logger.log(level, fmt, *args)
            return
        facility, client, text = (str(a) for a in args)
        # "[thrd:main]: what happened": the thread goes in its own field, the message stays readable.
        extra: dict[str, object] = {"facility": facility, "client": client}
        thread, sep, rest = text.partition("]: ")
        if sep and thread.startswith("[thrd:"):
            text, extra["rdkafka_thread"] = rest, thread[6:]
        if level >= logging.WARNING:
            self._recent.append(text)
            line = (level, facility, _ATTEMPT.sub("", text))
            now = self._clock()
            last = self._last.pop(line, None)
            if last is not None and now - last[0] < self.repeat_window:
                self._last[line] = (last[0], last[1] + 1)
                return
            if last is not None and last[1]:
                extra["repeated"] = last[1]
            self._last[line] = (now, 0)
            if len(self._last) > 256:
                del self._last[next(iter(self._last))]
        self.logger.log(level, "%s", text, extra=extra)

    def logged(self, message: str) -> bool:
        """Whether librdkafka logged this failure itself lately (an error callback then need not)."""
        return any(message in line for line in list(self._recent))
