"""A test-only domain whose projection can hold the query DB's writer on purpose.

Loaded by the server subprocess (CQRSKIT_DOMAINS=...,gate_domain with this directory
on PYTHONPATH), it makes "the views have not caught up yet" observable without
relying on timing: while the file named by CQRSKIT_TEST_GATE_FILE exists, applying a
record inserted with `"gate": true` blocks. Projections run on the view store's one
writer thread, so every projection's progress stops behind it. On entering the hold
it creates `<gate file>.held`, so a test knows the hold has begun. The hold is
bounded, so a failing test cannot wedge the server for long.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cqrskit.domains.records import RecordInserted
from cqrskit.messages import Envelope
from cqrskit.ports import Collection, ViewWriter
from cqrskit.registry import Domain, Projection, projects

domain = Domain("gate")

GATE_FILE = os.environ.get("CQRSKIT_TEST_GATE_FILE")
MAX_HOLD_SECONDS = 30.0


@domain.projection
class Gate(Projection):
    name = "gate"
    collections = (Collection("gate_passed"),)

    @projects(RecordInserted)
    def inserted(self, event: RecordInserted, envelope: Envelope, views: ViewWriter) -> None:
        if GATE_FILE and event.data.get("gate") is True:
            gate = Path(GATE_FILE)
            if gate.exists():
                Path(f"{GATE_FILE}.held").touch()
            deadline = time.monotonic() + MAX_HOLD_SECONDS
            while gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        views.put("gate_passed", envelope.stream_id, {"id": envelope.stream_id})
