"""[adjustments] and the per-project `refunds` policy: defaults per provider, and bad values named at start-up."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from consumer.config import AdjustmentsConfig, ConfigError, load, parse
from consumer.model import RefundPolicy
from tests.test_config import BASE, EXAMPLE


def data(**sections: Any) -> dict[str, Any]:
    out = copy.deepcopy(BASE)
    out.update(sections)
    return out


def test_defaults_off_with_each_providers_policy() -> None:
    cfg = parse(BASE, env={})
    assert cfg.adjustments == AdjustmentsConfig()
    assert cfg.adjustments.enabled is False and cfg.adjustments.orphan_wait == 600.0
    assert cfg.adjustments.schema.name == "order_adjusted.avsc" and cfg.adjustments.schema.exists()
    assert cfg.providers["kameleoon"].projects["site1"].rules.refunds is RefundPolicy.RETRACT
    assert cfg.providers["convert"].projects["1111_2222"].rules.refunds is RefundPolicy.SKIP
    assert cfg.providers["conductrics"].projects["ac-1"].rules.refunds is RefundPolicy.SKIP


def test_the_example_documents_the_section() -> None:
    cfg = load(EXAMPLE, env={"CONDUCTRICS_API_KEY": "x"})
    assert cfg.adjustments == AdjustmentsConfig()


def test_a_configured_section() -> None:
    d = data(adjustments={"enabled": True, "topic": "orders.adj", "event_type_header": "type", "orphan_wait": "30m"})
    d["kameleoon"]["projects"]["site1"]["refunds"] = "skip"
    cfg = parse(d, env={})
    assert (cfg.adjustments.enabled, cfg.adjustments.topic, cfg.adjustments.event_type_header,
            cfg.adjustments.orphan_wait) == (True, "orders.adj", "type", 1800.0)
    assert cfg.providers["kameleoon"].projects["site1"].rules.refunds is RefundPolicy.SKIP


def _error(d: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(d, env={})
    return info.value


@pytest.mark.parametrize(("path", "value", "key", "says"), [
    ("convert.projects.1111_2222.refunds", "retract", "convert.projects.1111_2222.refunds", "documents no way"),
    ("conductrics.projects.ac-1.refunds", "retract", "conductrics.projects.ac-1.refunds", "documents no way"),
    ("kameleoon.projects.site1.refunds", "undo", "kameleoon.projects.site1.refunds", "expected one of"),
])
def test_a_bad_policy_names_its_key(path: str, value: str, key: str, says: str) -> None:
    d = copy.deepcopy(BASE)
    section, _, name, field = path.split(".")
    d[section]["projects"][name][field] = value
    err = _error(d)
    assert err.key == key and says in err.message


@pytest.mark.parametrize(("section", "key", "says"), [
    ({"topic": "t"}, "adjustments.topic", "must differ"),
    ({"topic": "t.dlq"}, "adjustments.topic", "must differ"),
    ({"orphan_wait": "soon"}, "adjustments.orphan_wait", "duration"),
    ({"event_type_header": " "}, "adjustments.event_type_header", "must not be empty"),
    ({"schema": "no/such.avsc"}, "adjustments.schema", "no such file"),
    ({"enable": True}, "adjustments.enable", "did you mean 'enabled'"),
])
def test_a_bad_section_names_its_key(section: dict[str, Any], key: str, says: str) -> None:
    err = _error(data(adjustments=section))
    assert err.key == key and says in err.message
