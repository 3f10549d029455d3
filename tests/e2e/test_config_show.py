"""`cqrskit config show` over the real console script: every setting with its source,
secrets masked, as a table and as JSON."""

from __future__ import annotations

import json

import pytest

from cqrskit.config import Settings

from .harness import run_cli

pytestmark = pytest.mark.e2e

ENV = {
    "CQRSKIT_COMMAND_DB": "postgresql://app:CmdDbPassword@db.internal:5432/cqrskit",
    "CQRSKIT_HANDLER_API_KEY": "cqk_abc123_HandlerKeySecret",
    "CQRSKIT_OIDC_JWKS_URL": "https://idp.example/keys?sig=SigSecret",
    "CQRSKIT_EVENTHUBS_CONNECTION_STRING": (
        "Endpoint=sb://hub.servicebus.windows.net/;SharedAccessKeyName=send;"
        "SharedAccessKey=EventHubsSecret="),
    "CQRSKIT_RATE_LIMIT": "5",
}
SECRETS = ("CmdDbPassword", "HandlerKeySecret", "SigSecret", "EventHubsSecret")


def _no_secrets(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, secret


def test_config_show_json_lists_every_setting_with_its_source_and_masks_secrets() -> None:
    done = run_cli("config", "show", "--json", env=ENV)
    assert done.returncode == 0, done.stderr
    _no_secrets(done.stdout + done.stderr)
    shown = json.loads(done.stdout)
    for name in Settings.model_fields:
        assert f"CQRSKIT_{name.upper()}" in shown, name
    assert shown["CQRSKIT_RATE_LIMIT"] == {"value": 5.0, "source": "env"}
    assert shown["CQRSKIT_PORT"] == {"value": 8000, "source": "default"}
    assert shown["CQRSKIT_HANDLER_API_KEY"] == {"value": "***", "source": "env"}
    assert shown["CQRSKIT_COMMAND_DB"]["value"] == (
        "postgresql://app:***@db.internal:5432/cqrskit")
    assert shown["CQRSKIT_OIDC_JWKS_URL"]["value"] == "https://idp.example/keys?sig=***"
    assert shown["CQRSKIT_QUERY_DB"]["value"].startswith("sqlite:///")
    # A variable an adapter reads itself is listed too, masked whole.
    assert shown["CQRSKIT_EVENTHUBS_CONNECTION_STRING"] == {
        "value": "***", "source": "env, read by an adapter"}


def test_config_show_table_masks_secrets_and_bad_values_are_refused_without_them() -> None:
    done = run_cli("config", "show", env=ENV)
    assert done.returncode == 0, done.stderr
    _no_secrets(done.stdout + done.stderr)
    for expected in ("CQRSKIT_COMMAND_DB", "postgresql://app:***@db.internal", "env",
                     "default", "CQRSKIT_HANDLER_API_KEY"):
        assert expected in done.stdout, expected
    # An invalid value is named in the error, with its secret masked.
    bad = run_cli("config", "show", env={
        **ENV, "CQRSKIT_QUERY_HANDLER_URL": "http://api:BadUrlSecret@handler?x=1"})
    assert bad.returncode != 0
    assert "query_handler_url" in bad.stderr and "http://api:***@handler" in bad.stderr
    assert "BadUrlSecret" not in bad.stdout + bad.stderr
