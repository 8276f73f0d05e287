"""Shared test plumbing: each phase's report on the test item (for log dumps), and a real
redis-server per test module for the integration and e2e suites, and a real OCI registry."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests import netlab
from tests.integration.redis_server import RedisServer

# The real OCI registry fixtures (oci_registry, oci_tls_registry, oci_auth_registry).
pytest_plugins = ("tests.oci_registry",)


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


@pytest.fixture(scope="session")
def lab() -> Iterator[netlab.Lab]:
    """The network suite's test hosts (tests/netlab.py). Only in a namespace of its own: a
    test that could send packets to a real address fails here instead."""
    why_not = netlab.check_isolated()
    if why_not is not None:
        pytest.fail(f"the network suite must run isolated: {why_not}")
    with netlab.lab() as world:
        yield world
