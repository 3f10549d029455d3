"""Fixtures for the deployment entry points: the Function app, loaded as the host does."""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "azure"

LoadFunctionApp = Callable[[dict[str, str]], Awaitable[ModuleType]]


@pytest.fixture
async def load_function_app(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LoadFunctionApp]:
    """Import deploy/azure/function_app.py afresh with these app settings (environment).

    Each load is a new module, so a new FunctionsHost (one per worker process on
    Azure) bound to this test's event loop; every one is closed at the end.
    """
    pytest.importorskip("azure.functions", reason="install the functions extra: "
                        "pip install -e '.[dev]'")
    loaded: list[ModuleType] = []

    async def load(settings: dict[str, str]) -> ModuleType:
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        spec = importlib.util.spec_from_file_location(
            f"function_app_{uuid.uuid4().hex[:8]}", DEPLOY / "function_app.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded.append(module)
        return module

    yield load
    for module in loaded:
        await module.host.close()


def indexed(module: ModuleType) -> list[Any]:
    """The app's functions as the host indexes them (once: a second indexing fails)."""
    if not hasattr(module, "_indexed"):
        module._indexed = module.app.get_functions()
    return list(module._indexed)


def user_functions(module: ModuleType) -> dict[str, Callable[..., Any]]:
    """The functions by name: each the decorated user function the host would call."""
    return {
        str(function.get_function_name()): function.get_user_function()
        for function in indexed(module)
    }
