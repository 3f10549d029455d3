"""Fixtures for the end-to-end tests: real `cqrskit serve` subprocesses, torn down always."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import ServerPool, server_pool


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
