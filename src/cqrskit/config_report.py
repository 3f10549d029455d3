"""The effective settings, where each came from, with secrets masked: `cqrskit config show`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from cqrskit.config import Settings
from cqrskit.redaction import MASK, redact

PREFIX = "CQRSKIT_"
# Variables outside Settings that adapters read themselves (CQRSKIT_EVENTHUBS_CONNECTION_
# STRING, the variable a cosmos:// URL's key_env names): masked whole when the name
# says they hold a secret.
_SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CONNECTION_STRING|CREDENTIAL",
                          re.IGNORECASE)


@dataclass(frozen=True)
class Entry:
    variable: str
    value: Any
    source: str  # "env", "default", or "env, read by an adapter"


def _shown(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


def report(settings: Settings, environ: Mapping[str, str] = os.environ) -> list[Entry]:
    """Every setting's effective value and source, secrets masked; then the other
    CQRSKIT_* variables set in `environ`."""
    present = {name.upper() for name in environ}
    derived = {"command_db": settings.command_db_url, "query_db": settings.query_db_url}
    entries = []
    for name in Settings.model_fields:
        variable = PREFIX + name.upper()
        value = getattr(settings, name)
        source = "env" if variable in present else "default"
        if value is None and name in derived:
            value, source = derived[name], "default (from CQRSKIT_DATA_DIR)"
        entries.append(Entry(variable, _shown(value), source))
    known = {entry.variable for entry in entries}
    for variable in sorted(present - known):
        if variable.startswith(PREFIX):
            raw = next(v for k, v in environ.items() if k.upper() == variable)
            value = MASK if raw and _SECRET_NAME.search(variable) else redact(raw)
            entries.append(Entry(variable, value, "env, read by an adapter"))
    return entries
