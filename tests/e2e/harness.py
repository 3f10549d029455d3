"""Start the real `cqrskit` console script as a subprocess and talk to it over HTTP.

Every server gets a free port, its own data directory and a log file next to it;
its environment carries no CQRSKIT_* variable of the caller, only the ones a test
passes, so a developer's shell settings never leak into a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

E2E_DIR = Path(__file__).resolve().parent
T = TypeVar("T")

# The servers speak plain HTTP, but httpx builds an SSL context (loading the CA
# bundle, ~70 ms) for every client it creates; build it once and share it.
_SSL_CONTEXT = ssl.create_default_context()


def cqrskit_executable() -> str:
    candidate = Path(sys.executable).parent / "cqrskit"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("cqrskit")
    if found is None:
        raise RuntimeError("the cqrskit console script is not installed next to this Python")
    return found


CQRSKIT = cqrskit_executable()


def _die_with_parent() -> list[str]:
    """On Linux, a command prefix that has the child get SIGTERM if the test process dies.

    Fixture teardown stops every server; this covers a test run that is itself
    killed, so no `cqrskit serve` outlives it. util-linux's setpriv sets the signal
    and execs the command, keeping its pid. Not a `preexec_fn`: with one, Python
    runs the at-fork handlers in the child, and OpenTelemetry's tracer provider
    (which tests install in this process) then starts a thread pool there, which
    can deadlock on a lock another thread held at the fork.
    """
    if not sys.platform.startswith("linux") or shutil.which("setpriv") is None:
        return []
    return ["setpriv", "--pdeathsig", "TERM"]


DIE_WITH_PARENT = _die_with_parent()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without CQRSKIT_*, plus `extra`; test domains importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRSKIT_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(E2E_DIR), env.get("PYTHONPATH", "")) if p
    )
    # Wide enough that rich tables print every column without wrapping.
    env["COLUMNS"] = "250"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def wait_until(
    probe: Callable[[], T | None], *, timeout: float, interval: float = 0.05, what: str
) -> T:
    """Call `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CQRSKIT, *args], env=child_env(env), capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )


def query_sqlite(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read a cqrskit SQLite file directly, the way an operator would."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def write_sqlite(path: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Change a cqrskit SQLite file directly, in one transaction (to simulate damage)."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        with conn:
            for sql, params in statements:
                conn.execute(sql, params)
    finally:
        conn.close()


class _PortTaken(Exception):
    pass


class Server:
    """One `cqrskit serve` process on a data directory; restartable on the same files."""

    def __init__(self, data_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = dict(env or {})
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    # ------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 30.0) -> Server:
        """Start on a fresh free port and wait for /readyz; retry if the port was taken."""
        for _ in range(3):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                continue
        raise RuntimeError(f"no free port found:\n{self.log_tail()}")

    def _start_once(self, timeout: float) -> Server:
        assert self.proc is None, "already running"
        self.port = free_port()
        with self.log_path.open("ab") as log:
            log.write(f"\n=== starting on port {self.port} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*DIE_WITH_PARENT, CQRSKIT, "serve", "--host", "127.0.0.1", "--port",
                 str(self.port), "--data-dir", str(self.data_dir)],
                env=child_env(self.env), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        with self.client(timeout=2) as client:
            while True:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    self.proc = None
                    tail = self.log_tail(20)
                    if "address already in use" in tail.lower():
                        raise _PortTaken
                    raise RuntimeError(f"cqrskit serve exited with {code}:\n{tail}")
                try:
                    if client.get("/readyz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"cqrskit serve not ready after {timeout}s:\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait (a graceful shutdown); SIGKILL if it does not stop in time."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a crash."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    # ---------------------------------------------------------------- access

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, verify=_SSL_CONTEXT, **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 30.0)
        return httpx.AsyncClient(base_url=self.url, verify=_SSL_CONTEXT, **kwargs)

    @property
    def command_db(self) -> Path:
        return self.data_dir / "command.db"

    @property
    def query_db(self) -> Path:
        return self.data_dir / "query.db"

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `cqrskit ARGS --data-dir DIR` with this server's environment."""
        return run_cli(*args, "--data-dir", str(self.data_dir), env=self.env, timeout=timeout)

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class ServerPool:
    """Servers made by one fixture; all of them are stopped when it tears down."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers: list[Server] = []

    def new(self, env: Mapping[str, str] | None = None, *, name: str = "data") -> Server:
        """A started server on a new data directory."""
        data_dir = self.base / f"{name}-{len(self.servers)}"
        data_dir.mkdir(parents=True)
        server = Server(data_dir, env)
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        errors = []
        for server in self.servers:
            try:
                server.stop()
            except Exception as error:  # stop the others all the same
                errors.append(error)
        if errors:
            raise errors[0]


@contextlib.contextmanager
def server_pool(base: Path) -> Iterator[ServerPool]:
    pool = ServerPool(base)
    try:
        yield pool
    finally:
        pool.close()


def insert(client: httpx.Client, data: dict[str, Any], *, record_id: str | None = None,
           key: str | None = None) -> dict[str, Any]:
    """Insert a record and return the 202 body; fail loudly on anything else."""
    body: dict[str, Any] = {"data": data}
    if record_id is not None:
        body["id"] = record_id
    headers = {"Idempotency-Key": key} if key else {}
    response = client.post("/api/command/insert", json=body, headers=headers)
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


@dataclass
class KillLoad:
    """What `load_until_killed` saw: the 202 bodies by record id, the ids sent, and the
    ids sent but never answered (in flight at the kill)."""

    acked: dict[str, dict[str, Any]] = field(default_factory=dict)
    sent: set[str] = field(default_factory=set)
    unanswered: set[str] = field(default_factory=set)
    killed: bool = False


async def load_until_killed(
    server: Server,
    per_client: Sequence[Sequence[str]],
    send: Callable[[httpx.AsyncClient, str], Awaitable[httpx.Response]],
    kill_after: int,
) -> KillLoad:
    """One client per list of `per_client` sends its record ids in order; the server is
    SIGKILLed once `kill_after` commands were acknowledged. A client stops at its first
    unanswered command. Fails if the load finished before the kill."""
    load = KillLoad()
    assert server.proc is not None
    pid = server.proc.pid
    enough = asyncio.Event()

    async def worker(rids: Sequence[str]) -> None:
        async with server.async_client(timeout=30) as client:
            for rid in rids:
                load.sent.add(rid)
                try:
                    response = await send(client, rid)
                except httpx.TransportError:
                    load.unanswered.add(rid)
                    return
                assert response.status_code == 202, response.text
                load.acked[rid] = response.json()
                if len(load.acked) >= kill_after:
                    enough.set()

    async def killer() -> None:
        await enough.wait()
        os.kill(pid, signal.SIGKILL)
        load.killed = True

    kill_task = asyncio.create_task(killer())
    await asyncio.gather(*(worker(rids) for rids in per_client))
    assert kill_task.done(), "the load finished before the server was killed"
    return load
