"""Fixtures for the end-to-end tests: real `cqrskit serve` subprocesses, torn down always."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import ServerPool, server_pool
from .topology import NATS_HOST, NATS_PORT, Topology


@pytest.fixture
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    """Servers for one test."""
    with server_pool(tmp_path_factory.mktemp("servers")) as pool:
        yield pool


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    """Servers shared by the tests of one module."""
    with server_pool(tmp_path_factory.mktemp("module-servers")) as pool:
        yield pool


@pytest.fixture
def topology(
    postgres_dsn: str, postgres_schemas: Callable[..., str], require_service: Any,
    tmp_path: Path,
) -> Iterator[Topology]:
    """Processes in a schema and NATS stream of their own; stopped, then both dropped."""
    pytest.importorskip("nats", reason="install the nats extra: pip install -e '.[dev]'")
    require_service("NATS JetStream", NATS_HOST, NATS_PORT, start="nats-server -js")
    topo = Topology(postgres_dsn, postgres_schemas(), tmp_path)
    try:
        yield topo
    finally:
        topo.close()
