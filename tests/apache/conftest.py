"""The Apache Kafka suite's broker: the session broker when it is Apache Kafka, else one of this module's own.

These scenarios test what only a real Kafka broker shows, so they run on Apache Kafka whatever --broker says.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from consumer.apache_kafka import ApacheKafka
from tests.conftest import broker_kind


@pytest.fixture(scope="module")
def apache(request: pytest.FixtureRequest) -> Iterator[ApacheKafka]:
    if broker_kind(request.config) == "apache":
        k = request.getfixturevalue("broker")
        assert isinstance(k, ApacheKafka)
        yield k
    else:
        with ApacheKafka() as own:
            yield own
