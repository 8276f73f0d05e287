"""Shared test plumbing: each phase's report on the test item (for log dumps), and a real
redis-server per test module for the integration and e2e suites."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.integration.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
