"""The test-only fourth provider, registered from TOML, through config, matcher, decoder, pipeline and sandbox."""

from __future__ import annotations

import json
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest

from consumer.config import DEFAULT_SCHEMA, ConfigError, load, parse
from consumer.decoding import RawAvroDecoder, encode_raw, read_schema_json, with_providers
from consumer.embedded import EmbeddedBroker
from consumer.matcher import MatchSettings, match
from consumer.metrics import Metrics
from consumer.model import Attribution, Channel, Exposure, Provider, Purchase
from consumer.producer import produce_values
from consumer.providers import registry
from consumer.providers.kameleoon import SAMPLE_SITE
from consumer.sandbox import Sandbox
from tests.conftest import config_dict, run_until_done, to_toml

MODULE = "tests.providers.acme"
API_KEY = "acme-key-0123456789"
ROOT = Path(__file__).resolve().parents[3]
T0 = 1_750_000_000_000
HOUR = 3_600_000


def acme_section(base_url: str, **project: Any) -> dict[str, Any]:
    return {"retry": {"base_delay": "10ms", "max_delay": "200ms"},
            "projects": {"shop": {"base_url": base_url, "api_key": API_KEY, "goals": ["signup", "order"],
                                  **project}}}


def minimal(**sections: Any) -> dict[str, Any]:
    return {"kafka": {"bootstrap_servers": "x:1", "topic": "t", "group_id": "g", "dlq_topic": "d"}, **sections}


def test_configured_from_toml_with_its_own_defaults(tmp_path: Path) -> None:
    path = tmp_path / "acme.toml"
    path.write_text(to_toml(minimal(providers={"modules": [MODULE]},
                                    acme=acme_section("https://acme.test", api_key="${ACME_KEY}"))))
    cfg = load(path, env={"ACME_KEY": API_KEY})
    acme = cfg.providers["acme"]
    rules = acme.projects["shop"].rules
    assert rules.goals == ("signup", "order")
    assert rules.attribution_window == 14 * 86400  # the package's default, not a built-in provider's
    assert rules.attribution is Attribution.FIRST_TOUCH
    assert acme.projects["shop"].base_url == "https://acme.test"
    assert cfg.provider_modules == (MODULE,)
    assert API_KEY in cfg.secrets() and API_KEY not in repr(cfg)
    assert "ACME" in cfg.decoding.providers  # the reader schema gets its symbol
    assert set(registry.modules(cfg)) == {Provider("ACME")}  # the only provider with a project


def test_a_bad_provider_module_or_section_fails_at_start_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse(minimal(providers={"modules": ["tests.providers.nowhere"]}, acme=acme_section("https://a.test")))
    assert err.value.key == "providers.modules[0]" and "cannot be imported" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse(minimal(providers={"modules": ["consumer.model"]}, kameleoon={"projects": {"s": {"goals": [1]}}}))
    assert err.value.key == "providers.modules[0]" and "has no PROVIDER" in str(err.value)
    # Without the module, its section is an unknown key: a config never half-works.
    with pytest.raises(ConfigError) as err:
        parse(minimal(acme=acme_section("https://a.test"), kameleoon={"projects": {"s": {"goals": [1]}}}))
    assert err.value.key == "acme"
    # Its own validation names its own keys.
    section = acme_section("https://a.test")
    del section["projects"]["shop"]["api_key"]
    with pytest.raises(ConfigError) as err:
        parse(minimal(providers={"modules": [MODULE]}, acme=section))
    assert err.value.key == "acme.projects.shop.api_key"


def _purchase(order: str, exposures: list[tuple[str, str, int]], revenue: str = "12.50",
              provider: str = "ACME", project: str = "shop") -> Purchase:
    return Purchase(f"ev-{order}", order, T0, Channel.STORE, "EUR", Decimal(revenue), 1, None,
                    tuple(Exposure(Provider(provider), project, exp, "2", visitor, at)
                          for visitor, exp, at in exposures))


def test_the_matcher_applies_its_identity_rule_key_and_attribution_model() -> None:
    cfg = parse(minimal(providers={"modules": [MODULE]}, acme=acme_section("https://a.test")))
    from tests.providers.acme.keys import acme_key

    settings = MatchSettings.from_config(cfg)
    # first_touch (its default): of two visitors, the one exposed first gets the conversion, all goals.
    d = match(_purchase("o-1", [("late", "1", T0 - HOUR), ("early", "1", T0 - 2 * HOUR)]), settings, T0)
    [c] = d.conversions
    assert (c.visitor_id, c.goals, c.revenue, c.key) == ("early", ("signup", "order"), Decimal("12.50"),
                                                         acme_key("shop", "early", "o-1"))
    assert [r.reason for r in d.rejections] == ["not_credited"]
    # Its window is 14 days; an empty visitor id is no identity (the default rule).
    d = match(_purchase("o-2", [("v", "1", T0 - 15 * 24 * HOUR), ("", "1", T0 - HOUR)]), settings, T0)
    assert d.conversions == () and sorted(r.reason for r in d.rejections) == ["no_identity", "outside_window"]


def _writer_schema(tmp_path: Path) -> Path:
    path = tmp_path / "writer.avsc"
    path.write_text(json.dumps(with_providers(read_schema_json(DEFAULT_SCHEMA), ["ACME"])))
    return path


def test_the_reader_schema_is_extended_from_the_registry(tmp_path: Path) -> None:
    writer = _writer_schema(tmp_path)
    body = encode_raw(_purchase("o-1", [("v", "1", T0)]), fastavro.parse_schema(read_schema_json(writer)))
    cfg = parse(minimal(providers={"modules": [MODULE]}, acme=acme_section("https://a.test")))
    extended = RawAvroDecoder(writer, DEFAULT_SCHEMA, 1 << 20, cfg.decoding.providers).decode(body)
    assert [e.provider for e in extended.exposures] == [Provider("ACME")]
    # A reader that does not register it reads the newer writer's symbol as UNKNOWN: skipped, counted.
    plain = RawAvroDecoder(writer, DEFAULT_SCHEMA, 1 << 20).decode(body)
    assert plain.exposures == () and plain.unknown_provider_exposures == 1
    # The published contract is untouched: the built-in three and UNKNOWN.
    symbols = read_schema_json(DEFAULT_SCHEMA)["fields"]
    assert "ACME" not in json.dumps(symbols)


async def test_delivers_end_to_end_through_the_pipeline_and_the_sandbox(
    broker: EmbeddedBroker, topics: dict[str, str], tmp_path: Path,
) -> None:
    sandbox = Sandbox(providers=[MODULE], acme_keys={"shop": API_KEY}, conductrics_keys={"ac-xxx": "api-1234567890"})
    url = await sandbox.start()
    try:
        data = config_dict(broker.bootstrap, topics, url, providers={"modules": [MODULE]},
                           acme=acme_section(url))
        cfg = parse(data, env={})
        now = int(time.time() * 1000)
        items = []
        for i in range(150):
            exposures = [Exposure(Provider("ACME"), "shop", "7", "1", f"visitor-{i}", now - (i % 5 + 1) * HOUR)]
            if i % 3 == 0:  # a later second identity: not credited (first_touch)
                exposures.append(Exposure(Provider("ACME"), "shop", "7", "2", f"other-{i}", now - 30_000))
            if i % 4 == 0:  # and a built-in provider beside it, in the same events
                exposures.append(Exposure(Provider("KAMELEOON"), SAMPLE_SITE, "1", "2", f"k-{i}", now - HOUR))
            items.append(Purchase(f"ev-{i}", f"ORD-{i}", now, Channel.STORE, "EUR", Decimal(f"{10 + i}.25"), 2,
                                  None, tuple(exposures)))
        settings = MatchSettings.from_config(cfg)
        want = [c for p in items for c in match(p, settings, now).conversions]
        want_acme = sorted((c.visitor_id, c.goals, float(c.revenue or 0), f"acme|shop|{c.key}")
                           for c in want if c.provider.slug == "acme")
        want_kameleoon = sorted(c.key for c in want if c.provider.slug == "kameleoon")
        assert len(want_acme) == 150 and want_kameleoon

        # Producers of this deployment write the contract with the registered provider's symbol added.
        schema = fastavro.parse_schema(read_schema_json(_writer_schema(tmp_path)))
        values = [(p.order_id.encode(), encode_raw(p, schema)) for p in items]
        assert produce_values(broker.bootstrap, topics["topic"], values).delivered == len(items)
        sandbox.fail("acme", 503, times=2)  # a transient error to retry through, as for any provider

        metrics = Metrics()
        app = await run_until_done(cfg, len(items), metrics=metrics)
        assert app.consumed == len(items)

        got = sorted((r.visitor, r.goals, r.revenue, r.key) for r in sandbox.records_for("acme"))
        assert got == want_acme  # every credited visitor, every goal, the revenue, its key: once each
        assert sandbox.duplicates() == {}
        assert {r.user_agent for r in sandbox.records_for("acme")} == {"offline-conversions/1.0 (acme)"}
        statuses = sandbox.status_counts("acme")
        assert statuses.get(503) == 2 and set(statuses) == {200, 503}  # the API key was accepted each time
        assert statuses[200] < len(want_acme)  # batched: many conversions per request
        assert sorted(sandbox.kameleoon_nonces()) == want_kameleoon  # the built-in provider alongside
        delivered = metrics.registry.get_sample_value(
            "offline_conversions_conversions_total", {"provider": "acme", "outcome": "delivered"})
        assert delivered == len(want_acme)
    finally:
        await sandbox.stop()


def test_nothing_outside_its_package_names_it() -> None:
    # The proof that adding a provider needs no edit elsewhere: no file of the service, its schemas,
    # benchmarks or other tests mentions it (deploy/ has an unrelated Conductrics account called acme).
    out = subprocess.run(
        ["git", "grep", "-i", "-l", "acme", "--", "consumer", "schemas", "benchmarks", "tests", "pyproject.toml",
         ":!tests/providers/acme"],
        cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 1 and out.stdout == "", out.stdout  # 1: no match


def test_the_sandbox_command_takes_its_emulator_options(tmp_path: Path) -> None:
    from consumer.sandbox import load_options, option_names

    assert "acme_keys" in option_names([MODULE]) and "acme_keys" not in option_names()
    path = tmp_path / "sandbox.json"
    path.write_text(json.dumps({"providers": [MODULE], "acme_keys": {"shop": API_KEY}}))
    sandbox = Sandbox(**load_options(path))
    assert sandbox.slugs == ("kameleoon", "convert", "conductrics", "acme")
    with pytest.raises(TypeError, match="acme_keys"):
        Sandbox(acme_keys={"shop": API_KEY})  # without the module, nobody takes the option
