"""The `offline-conversions` command: run, check-config, explain, sandbox, produce, demo, dlq replay, rewind."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from consumer.config import ClientCheck, Config, ConfigError, ConfigErrors, load
from consumer.providers.registry import ProviderModuleError

EXIT_CONFIG = 2


def _load_or_exit(path: str, *, clients: bool = False, placeholders: bool = False,
                  warnings: list[ConfigError] | None = None) -> Config:
    """The config, or exit 2 naming every bad key; `clients`: the Kafka clients' settings are built too."""
    check: ClientCheck | None = None
    if clients:
        from consumer.kafkacheck import check as check_clients

        check = check_clients
    try:
        return load(path, placeholders=placeholders, check=check, warnings=warnings)
    except ConfigError as exc:
        errors = exc.errors if isinstance(exc, ConfigErrors) else (exc,)
        if len(errors) == 1:
            print(f"offline-conversions: {errors[0]}", file=sys.stderr)
        else:
            print(f"offline-conversions: {path}: {len(errors)} errors", file=sys.stderr)
            for err in errors:
                print(f"  {err}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    from consumer import logs
    from consumer.app import Application

    cfg = _load_or_exit(args.config, clients=True)
    if args.workers > 1:
        return run_workers(args.config, args.workers)
    if args.worker_index is not None:
        cfg = for_worker(cfg, args.worker_index)
    logs.setup(cfg.logging.level, cfg.logging.format, cfg.secrets())
    try:
        app = Application(cfg)
    except Exception as exc:  # a schema that does not parse, a registry URL that is wrong…
        print(f"offline-conversions: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(app.run())
    except ConfigError as exc:  # found only when it is used: the metrics port is taken
        logging.getLogger("consumer").error(str(exc), extra={"key": exc.key})
        return EXIT_CONFIG


def for_worker(cfg: Config, index: int) -> Config:
    """Worker `index` of a multi-process container: its own metrics and control ports and static member id."""
    consumer = dict(cfg.kafka.consumer)
    if "group.instance.id" in consumer:
        consumer["group.instance.id"] = f"{consumer['group.instance.id']}-{index}"
    port = cfg.metrics.port + index if cfg.metrics.port else 0
    control = cfg.control.port + index if cfg.control.port else 0
    return replace(cfg, kafka=replace(cfg.kafka, consumer=consumer), metrics=replace(cfg.metrics, port=port),
                   control=replace(cfg.control, port=control))


def run_workers(config: str, workers: int) -> int:
    """N consumer processes, each a group member, to use every core; signals are passed on to them."""
    children = [
        subprocess.Popen([sys.executable, "-m", "consumer", "run", "--config", config, "--worker-index", str(i)])
        for i in range(workers)
    ]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, key=abs)


def cmd_check_config(args: argparse.Namespace) -> int:
    warnings: list[ConfigError] = []
    cfg = _load_or_exit(args.file, clients=True, placeholders=args.no_env, warnings=warnings)
    for w in warnings:
        print(f"offline-conversions: warning: {w}", file=sys.stderr)
    projects = {slug: sorted(section.projects) for slug, section in cfg.providers.items()}
    print(f"{args.file}: ok — topic {cfg.kafka.topic!r}, group {cfg.kafka.group_id!r}, "
          f"decoding {cfg.decoding.format}, projects {json.dumps(projects)}"
          + (" (${…} not read: values from them not checked)" if args.no_env else ""))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from consumer.explain import explain, parse_now, render_text

    cfg = _load_or_exit(args.config)
    assert isinstance(cfg, Config)
    try:
        event = json.loads(Path(args.event).read_text() if args.event != "-" else sys.stdin.read())
    except (OSError, ValueError) as exc:
        print(f"offline-conversions: cannot read the event: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        now_ms = int(time.time() * 1000) if args.now is None else parse_now(args.now)
    except ValueError as exc:
        print(f"offline-conversions: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from consumer.explain_adjustment import is_adjustment

    if is_adjustment(event):
        return _explain_adjustment(args, cfg, event, now_ms)
    try:
        report = explain(cfg, event, now_ms)
    except ValueError as exc:
        print(f"offline-conversions: invalid event: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(report, indent=2, default=str) if args.json else render_text(report))
    return 0


def _explain_adjustment(args: argparse.Namespace, cfg: Config, event: dict[str, object], now_ms: int) -> int:
    """`explain` of an order adjustment: needs the purchase it adjusts (--purchase), and the earlier ones."""
    from consumer.explain_adjustment import explain_adjustment, render_adjustment_text

    if args.purchase is None:
        print("offline-conversions: an order adjustment is explained with the purchase it adjusts: "
              "--purchase PURCHASE.json", file=sys.stderr)
        return EXIT_CONFIG
    try:
        purchase = json.loads(Path(args.purchase).read_text())
        previous = [json.loads(Path(f).read_text()) for f in args.previous]
    except (OSError, ValueError) as exc:
        print(f"offline-conversions: cannot read an event: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        report = explain_adjustment(cfg, event, purchase, previous, now_ms)
    except ValueError as exc:
        print(f"offline-conversions: invalid event: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(report, indent=2, default=str) if args.json else render_adjustment_text(report))
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from consumer.providers.registry import load_all as load_options_of
    from consumer.sandbox import load_options, parse_profile, profiles_of, serve

    try:
        options = load_options(args.options) if args.options else {}
        if args.provider_module:  # emulate these providers too (as [providers] modules registers them)
            options["providers"] = [*options.get("providers", ()), *args.provider_module]
            load_options_of(options["providers"])
        if args.profile:
            options["profiles"] = [*options.get("profiles", ()), *(s for t in args.profile for s in parse_profile(t))]
        for spec in options.get("profiles", ()):
            profiles_of(spec)  # a bad profile fails here, naming its setting, not once the server runs
    except (OSError, TypeError, ValueError, ProviderModuleError) as exc:
        print(f"offline-conversions: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    serve(args.host, args.port, **options)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from consumer.producer import produce_samples

    produced = produce_samples(
        args.bootstrap_servers, args.topic, args.count, rate=args.rate, fmt=args.format,
        registry_url=args.schema_registry_url, malformed=args.malformed, seed=args.seed,
    )
    print(f"produced {produced} events to {args.topic}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from consumer.demo import run_demo

    return run_demo(events=args.events, malformed=args.malformed, seed=args.seed)


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from consumer.replay import run_replay

    code: int = run_replay(args)
    return code


def cmd_rewind(args: argparse.Namespace) -> int:
    from consumer.ops.rewind import run_rewind

    return run_rewind(args, _load_or_exit(args.config))


def cmd_report(args: argparse.Namespace) -> int:
    from consumer.ledger.read import scan
    from consumer.ledger.report import build, latest, render

    cfg = _load_or_exit(args.config)
    settings = {**cfg.kafka.common, "bootstrap.servers": cfg.kafka.bootstrap_servers}
    records = latest(scan(settings, cfg.ledger.topic)).values()
    rep = build(records, since=args.since, until=args.until, provider=args.provider, project=args.project)
    sys.stdout.write(render(rep, args.format))
    return 0


def cmd_ledger_show(args: argparse.Namespace) -> int:
    from consumer.ledger.read import scan
    from consumer.ledger.record import to_avro

    cfg = _load_or_exit(args.config)
    settings = {**cfg.kafka.common, "bootstrap.servers": cfg.kafka.bootstrap_servers}
    found = [to_avro(r) for _, r in scan(settings, cfg.ledger.topic) if r is not None and r.order_id == args.order_id]
    for d in found:
        print(json.dumps(d, sort_keys=True))
    if not found:
        print(f"offline-conversions: no ledger record for order {args.order_id!r}", file=sys.stderr)
        return 1
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from consumer.ledger.forget import matching, tombstones
    from consumer.ledger.read import scan

    cfg = _load_or_exit(args.config)
    settings = {**cfg.kafka.common, "bootstrap.servers": cfg.kafka.bootstrap_servers}
    keys = matching(scan(settings, cfg.ledger.topic), customer_id=args.customer_id, visitor_id=args.visitor)
    written = tombstones(settings, cfg.ledger.topic, keys) if keys else 0
    print(f"{written} ledger record(s) tombstoned in {cfg.ledger.topic!r} (compaction removes them after "
          "delete.retention.ms).")
    print(f"Still elsewhere: the source topic {cfg.kafka.topic!r} holds the purchases until its retention.ms; "
          f"the dead-letter topic {cfg.kafka.dlq_topic!r} holds failed events whole until its retention.ms; "
          "and the providers keep what they were sent.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="offline-conversions",
                                description="Offline purchases from Kafka into A/B-testing conversions.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the service")
    run.add_argument("--config", required=True, help="TOML config file")
    run.add_argument("--workers", type=int, default=1,
                     help="consumer processes in this container, each a group member (metrics port + index)")
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.add_argument("--no-env", action="store_true",
                       help="do not read ${VAR} or ${file:...}: check a file before its secrets exist "
                            "(what they stand for is not judged)")
    check.set_defaults(func=cmd_check_config)

    ex = sub.add_parser("explain", help="show what the service would send for one event given as JSON")
    ex.add_argument("--config", required=True)
    ex.add_argument("--now", help="evaluate at this time instead of now: epoch milliseconds or ISO-8601 with an offset")
    ex.add_argument("--json", action="store_true", help="print the report as JSON")
    ex.add_argument("--purchase", help="for an order adjustment: the purchase it adjusts, as a JSON file")
    ex.add_argument("--previous", action="append", default=[], metavar="ADJUSTMENT",
                    help="for an order adjustment: an earlier adjustment of the order, as a JSON file "
                         "(repeat, in the order they were applied)")
    ex.add_argument("event", help="the event (a purchase, or an order adjustment) as a JSON file, or - for stdin")
    ex.set_defaults(func=cmd_explain)

    sb = sub.add_parser("sandbox", help="serve the provider emulator")
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=8080)
    sb.add_argument("--options", help="JSON file of sandbox options (API keys, OAuth clients, limits)")
    sb.add_argument("--profile", action="append", metavar="PROVIDER:SETTINGS",
                    help="a latency profile, e.g. 'convert:median=120ms,p99=800ms,capacity=64,over=reject,"
                         "retry_after=1,errors=0.002,seed=1' ('*' for every provider; repeatable)")
    sb.add_argument("--provider-module", action="append", metavar="MODULE",
                    help="also emulate the provider of this module (as [providers] modules names it; repeatable)")
    sb.set_defaults(func=cmd_sandbox)

    pr = sub.add_parser("produce", help="produce sample purchases to a topic")
    pr.add_argument("--bootstrap-servers", required=True)
    pr.add_argument("--topic", required=True)
    pr.add_argument("--count", type=int, default=1000)
    pr.add_argument("--rate", type=float, default=0.0, help="events per second (0 = as fast as possible)")
    pr.add_argument("--format", choices=("avro", "confluent"), default="avro")
    pr.add_argument("--schema-registry-url", default="")
    pr.add_argument("--malformed", type=int, default=0, help="also produce this many malformed messages")
    pr.add_argument("--seed", type=int, default=7)
    pr.set_defaults(func=cmd_produce)

    demo = sub.add_parser("demo", help="run the whole pipeline on an embedded broker and sandbox")
    demo.add_argument("--events", type=int, default=3000)
    demo.add_argument("--malformed", type=int, default=30)
    demo.add_argument("--seed", type=int, default=7)
    demo.set_defaults(func=cmd_demo)

    dlq = sub.add_parser("dlq", help="dead-letter topic tools")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    replay = dlq_sub.add_parser("replay", help="re-drive dead-lettered events to the provider(s) that failed")
    replay.add_argument("--config", required=True)
    replay.add_argument("--provider", action="append",
                        help="only this provider, by its slug (e.g. kameleoon; see [providers]) (repeatable)")
    replay.add_argument("--stage", action="append",
                        help="only this stage: decode, match, dispatch, adjust (repeatable)")
    replay.add_argument("--error-class", action="append")
    replay.add_argument("--since", type=int, help="dead-lettered at or after this epoch ms")
    replay.add_argument("--until", type=int, help="dead-lettered before this epoch ms")
    replay.add_argument("--dry-run", action="store_true")
    replay.add_argument("--group-id", help="the replay's own consumer group (default: <group_id>.replay)")
    replay.set_defaults(func=cmd_dlq_replay)

    rep = sub.add_parser("report", help="reconcile from the ledger: per provider, project, goal and variation")
    rep.add_argument("--config", required=True)
    rep.add_argument("--since", type=int, help="purchases at or after this epoch ms")
    rep.add_argument("--until", type=int, help="purchases before this epoch ms")
    rep.add_argument("--provider", help="kameleoon, convert or conductrics")
    rep.add_argument("--project")
    rep.add_argument("--format", choices=("text", "json", "csv"), default="text")
    rep.set_defaults(func=cmd_report)

    led = sub.add_parser("ledger", help="ledger tools")
    led_sub = led.add_subparsers(dest="ledger_command", required=True)
    show = led_sub.add_parser("show", help="every ledger record of one order (a full scan)")
    show.add_argument("--config", required=True)
    show.add_argument("order_id")
    show.set_defaults(func=cmd_ledger_show)

    fg = sub.add_parser("forget", help="tombstone a person's ledger records; says what remains elsewhere")
    fg.add_argument("--config", required=True)
    who = fg.add_mutually_exclusive_group(required=True)
    who.add_argument("--customer-id")
    who.add_argument("--visitor")
    fg.set_defaults(func=cmd_forget)

    rw = sub.add_parser("rewind", help="move one provider's consumer group to a point in time (re-send from it)",
                        description="Moves the group <kafka.group_id>.<provider> to the first offset at or after "
                                    "TIME on every partition of [kafka] topic, so that provider alone receives "
                                    "everything since TIME again. Refused while the group has members.")
    rw.add_argument("--config", required=True)
    rw.add_argument("--provider", required=True, help="kameleoon, convert or conductrics")
    rw.add_argument("--to", required=True, metavar="TIME",
                    help="ISO-8601 with an offset (2026-12-01T09:00:00Z), epoch ms, or a duration ago (-2h, -7d)")
    rw.add_argument("--dry-run", action="store_true", help="print the offsets before and after, change nothing")
    rw.add_argument("--force", action="store_true",
                    help="skip the check for active members and ask the broker anyway; Kafka refuses to alter "
                         "a group with members, so this only helps when the members are known to have left")
    rw.set_defaults(func=cmd_rewind)
    return p


def _relative_times(argv: Sequence[str]) -> list[str]:
    """`--to -2h` as `--to=-2h`: argparse would take `-2h` for an option and say --to has no value."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--to" and re.fullmatch(r"-\d[\w.]*", arg):
            out[-1] = f"--to={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_relative_times(sys.argv[1:] if argv is None else argv))
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
