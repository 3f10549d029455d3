"""What a server process sets up first (cqrskit.process): the garbage collector."""

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.parametrize(("threshold", "expected"), [("10000", "[10000, 10, 10] True"),
                                                     ("0", "[700, 10, 10] False")])
def test_a_server_collects_young_objects_less_often_and_skips_its_startup_objects(
    threshold: str, expected: str, tmp_path: object
) -> None:
    """In a fresh interpreter, as a server process starts: CQRSKIT_GC_THRESHOLD sets how
    many allocations the youngest generation waits for, and what was loaded before is
    frozen out of later collections; 0 leaves Python's collector as it was."""
    script = textwrap.dedent("""
        import gc
        from cqrskit import process
        from cqrskit.config import Settings
        process.setup(Settings(), "serve")
        print(list(gc.get_threshold()), gc.get_freeze_count() > 1000)
        # Cycles made after the start are still collected.
        class Node: pass
        a, b = Node(), Node(); a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "CQRSKIT_DATA_DIR": str(tmp_path),
             "CQRSKIT_TELEMETRY": "none", "CQRSKIT_GC_THRESHOLD": threshold},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
