"""Integration fixtures: a real Redis per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.close()
