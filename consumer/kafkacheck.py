"""The Kafka clients' librdkafka settings checked offline: each client is built without a broker, then closed.

librdkafka validates every property when a client is created (unknown names, types, ranges, enum
values, SASL mechanisms, TLS files) and stops at the first bad one; this builds the consumer and the
DLQ producer from the final settings the service would use, without `bootstrap.servers` so nothing
connects, removes each property it rejects and tries again, so every bad property is reported, each
under the config key it came from, with librdkafka's own property names as suggestions.
"""

from __future__ import annotations

import ctypes
import difflib
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import Consumer, KafkaException

from consumer.app import Application
from consumer.config import Config, ConfigError, KafkaConfig, dotted
from consumer.dlq import DeadLetterWriter
from consumer.source import consumer_config

KAFKA_LOGGER = "rdkafka"
_BROKER_LISTS = ("bootstrap.servers", "metadata.broker.list")


@dataclass(frozen=True)
class Property:
    """One row of librdkafka's property table."""

    name: str
    scope: str  # "C" consumer, "P" producer, "*" both
    values: tuple[str, ...]  # the allowed values of an enum (or a "Supported: …" list), else ()
    alias_of: str | None
    type: str  # "integer", "string", "enum value", "boolean", "float"…


_ROW = re.compile(r"^([a-z][a-z0-9._]*)\s*\|\s*([CP*])\s*\|([^|]*)\|[^|]*\|[^|]*\|(.*)$")


def parse_properties(table: str) -> dict[str, Property]:
    """The rows of `rd_kafka_conf_properties_show`'s Markdown table (global and topic properties)."""
    out: dict[str, Property] = {}
    for line in table.splitlines():
        m = _ROW.match(line)
        if not m:
            continue
        name, scope, value_range, description = m.group(1), m.group(2), m.group(3).strip(), m.group(4)
        values: tuple[str, ...] = ()
        if "," in value_range and ".." not in value_range:
            values = tuple(v.strip() for v in value_range.split(",") if v.strip())
        elif supported := re.search(r"Supported: ([A-Za-z0-9_, -]+)\.", description):
            values = tuple(v.strip() for v in supported.group(1).split(",") if v.strip())
        alias = re.search(r"Alias for `([a-z0-9._]+)`", description)
        kind = re.search(r"\*Type: ([^*]+)\*", description)
        out.setdefault(name, Property(name, scope, values, alias.group(1) if alias else None,
                                      kind.group(1).strip() if kind else ""))
    return out


@functools.cache
def properties() -> dict[str, Property]:
    """librdkafka's own property table, read from the library the service runs with; {} if unreadable.

    The table is only for suggestions: reading it from the running library (not a copy in this
    repository) keeps the names right for whichever librdkafka confluent-kafka loaded.
    """
    try:
        return parse_properties(_properties_table())
    except (OSError, AttributeError, UnicodeDecodeError):
        return {}


def _properties_table() -> str:
    import confluent_kafka.cimpl as cimpl  # its handle also resolves the librdkafka it links

    lib = ctypes.CDLL(cimpl.__file__)
    libc = ctypes.CDLL(None)
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_conf_properties_show.argtypes = [ctypes.c_void_p]
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        raise OSError("open_memstream failed")
    lib.rd_kafka_conf_properties_show(stream)
    libc.fclose(stream)
    try:
        return ctypes.string_at(buf, size.value).decode()
    finally:
        libc.free(buf)


def _same(name: str) -> set[str]:
    """`name` and every name librdkafka treats as it (aliases both ways)."""
    table = properties()
    target = table[name].alias_of if name in table else None
    target = target or name
    return {name, target} | {p.name for p in table.values() if p.alias_of == target}


def suggest(name: str) -> str | None:
    guess = difflib.get_close_matches(name, list(properties()), n=1, cutoff=0.75)
    return guess[0] if guess else None


class _Origin:
    """Which config key a client's property came from: its own section, then [kafka.common]."""

    def __init__(self, kafka: KafkaConfig, section: str, derived: Mapping[str, str]) -> None:
        self.kafka, self.section, self.derived = kafka, section, derived

    def key(self, prop: str) -> str | None:
        names = _same(prop)
        own: Mapping[str, object] = getattr(self.kafka, self.section)
        for where, table in ((f"kafka.{self.section}", own), ("kafka.common", self.kafka.common)):
            for n in sorted(names):
                if n in table:
                    return dotted(where, n)
        for n in sorted(names):
            if n in self.derived:
                return self.derived[n]
        return None


def _named(text: str, conf: Mapping[str, object]) -> str | None:
    """The property of `conf` that librdkafka's message is about: named in quotes, named, or by its value."""
    for quoted in re.findall(r'"([a-z][a-z0-9._]*)"', text):
        for n in sorted(_same(quoted)):
            if n in conf:
                return n
    for n in conf:
        if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w.])", text):
            return n
    for n, v in conf.items():
        s = str(v)
        if len(s) >= 3 and re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", text):
            return n
    return None


def _message(text: str, prop: str, value: object) -> str:
    text = re.sub(r"^Failed to create (consumer|producer): ", "", text.strip())
    if text.startswith("No such configuration property"):
        guess = suggest(prop)
        return f'librdkafka has no property "{prop}"' + (f' (did you mean "{guess}"?)' if guess else "")
    out = f"librdkafka: {text}"
    table = properties()
    if text.startswith("Invalid value for"):  # librdkafka says no more than that: say what it expects
        kind = next((table[n].type for n in sorted(_same(prop)) if n in table and table[n].type), "")
        if kind:
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            out += f" (expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {shown})"
    if prop.endswith(".location") and isinstance(value, str) and not os.path.exists(value):
        out += f" (no such file: {value!r})"
    enum = next((table[n] for n in sorted(_same(prop)) if n in table and table[n].values), None)
    if enum is not None and isinstance(value, str):
        allowed = {v.lower(): v for v in enum.values}
        if value.lower() not in allowed:
            near = difflib.get_close_matches(value.lower(), list(allowed), n=1, cutoff=0.6)
            hint = f"did you mean {allowed[near[0]]!r}? " if near else ""
            out += f" ({hint}one of {', '.join(enum.values)})"
    return out


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _captured() -> Iterator[_Captured]:
    """librdkafka's log lines while the check runs, kept (not printed): its warnings become ours."""
    logger = logging.getLogger(KAFKA_LOGGER)
    handler, propagate, level = _Captured(), logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        logger.setLevel(level)


def offline(conf: Mapping[str, Any]) -> dict[str, Any]:
    """`conf` for a client that must not reach anything: no broker list, no token or ticket fetched at start.

    An OIDC client fetches a token while it is created, and a Kerberos one runs kinit: the check
    builds them with the default method and no ticket refresh, so their other settings are still
    checked by name, type and value.
    """
    out = {k: v for k, v in conf.items() if k not in _BROKER_LISTS}
    if str(out.get("sasl.oauthbearer.method", "")).lower() == "oidc":
        out["sasl.oauthbearer.method"] = "default"
    mechanism = str(out.get("sasl.mechanisms", out.get("sasl.mechanism", "GSSAPI")))  # librdkafka's default
    if mechanism.upper() == "GSSAPI" and str(out.get("security.protocol", "")).lower().startswith("sasl"):
        out["sasl.kerberos.min.time.before.relogin"] = 0
    return out


def _build(make: Callable[[dict[str, Any]], Callable[[], None]], conf: Mapping[str, Any], origin: _Origin,
           errors: list[ConfigError]) -> None:
    """Build one client (`make` returns its close), dropping each property it rejects, until it builds."""
    conf = offline(conf)
    reported = False
    for _ in range(len(conf) + 1):
        try:
            close = make(conf)
        except KafkaException as exc:
            text = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
        except (TypeError, ValueError) as exc:  # confluent-kafka's own checks of a setting's Python type
            text = str(exc)
        else:
            close()
            return
        prop = _named(text, conf)
        if prop is None:
            # Nothing to remove and try again without; after a removal, likely its consequence.
            if not reported:
                errors.append(ConfigError("kafka", f"librdkafka: {text.strip()}"))
            return
        key = origin.key(prop) or dotted(f"kafka.{origin.section}", prop)
        errors.append(ConfigError(key, _message(text, prop, conf[prop])))
        reported = True
        del conf[prop]


def _consumer(conf: dict[str, Any]) -> Callable[[], None]:
    consumer = Consumer(conf)

    def close() -> None:
        consumer.poll(0)  # serves the log lines queued while it was built (configuration warnings)
        consumer.close()

    return close


def _dlq_producer(cfg: Config) -> Callable[[dict[str, Any]], Callable[[], None]]:
    def make(conf: dict[str, Any]) -> Callable[[], None]:
        # The writer itself, so the check sees the settings it adds (idempotence, acks, timeouts).
        writer = DeadLetterWriter(cfg.kafka.dlq_topic, conf, cfg.pipeline.dlq_timeout)

        def close() -> None:
            writer.producer.poll(0)
            writer.close(0)

        return close

    return make


_CONFIG_WARNING = "CONFWARN"


def _warnings(records: list[logging.LogRecord], origins: list[_Origin]) -> list[ConfigError]:
    out: list[ConfigError] = []
    for r in records:
        text = r.getMessage()
        if getattr(r, "facility", None) != _CONFIG_WARNING or r.levelno < logging.WARNING:
            continue  # INFO-level notes, such as "No bootstrap.servers configured" (removed on purpose)
        key = "kafka"
        for name in re.findall(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+", text):
            found = next((k for o in origins if (k := o.key(name))), None)
            if found:
                key = found
                break
        if not any(w.key == key and w.message == f"librdkafka: {text}" for w in out):
            out.append(ConfigError(key, f"librdkafka: {text}"))
    return out


def check(cfg: Config) -> tuple[list[ConfigError], list[ConfigError]]:
    """(errors, warnings) from building the service's consumer and DLQ producer with `cfg`, offline."""
    if not cfg.kafka.group_id:  # missing, and reported already: librdkafka would only say so again
        cfg = replace(cfg, kafka=replace(cfg.kafka, group_id="check-config"))
    errors: list[ConfigError] = []
    consumer = _Origin(cfg.kafka, "consumer", {"group.id": "kafka.group_id"})
    producer = _Origin(cfg.kafka, "producer", {"message.timeout.ms": "pipeline.dlq_timeout"})
    with _captured() as logs:
        _build(_consumer, consumer_config(cfg.kafka), consumer, errors)
        _build(_dlq_producer(cfg), Application.producer_config(cfg), producer, errors)
    return errors, _warnings(logs.records, [consumer, producer])
