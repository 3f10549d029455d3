"""The `cqrskit` command line: serve the API, and operate projections and dead letters."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cqrskit import process
from cqrskit.config import Settings, environment_help
from cqrskit.errors import CqrskitError
from cqrskit.redaction import redact
from cqrskit.tenancy import DEFAULT

if TYPE_CHECKING:
    import subprocess  # nosec B404 # runs this program's own roles (cqrskit up)

    from cqrskit.api.auth import ApiKeys

T = TypeVar("T")
console = Console()

ENVIRONMENT_HELP = (
    "Settings come from environment variables; flags override them:\n\n\b\n"
    + environment_help()
)


def _settings(data_dir: Path | None, **overrides: Any) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    return Settings(**values)


def _setup(settings: Settings, role: str) -> None:
    try:
        process.setup(settings, role)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None


def _run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        return await coroutine

    try:
        return asyncio.run(main())
    except CqrskitError as error:
        raise click.ClickException(str(error)) from None


data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Directory of the SQLite files [env CQRSKIT_DATA_DIR; default ./data].",
)

host_option = click.option(
    "--host", default=None, help="Address to listen on [env CQRSKIT_HOST; 127.0.0.1]."
)
port_option = click.option("--port", type=int, default=None, help="Port [env CQRSKIT_PORT; 8000].")


def with_runtime(fn: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    """Open the stores for one CLI action and close them after."""

    @wraps(fn)
    def command(data_dir: Path | None, **kwargs: Any) -> T:
        from cqrskit.bootstrap import open_runtime

        settings = _settings(data_dir)
        command_db = settings.data_dir / "command.db"
        if settings.command_db is None and not command_db.exists():
            raise click.ClickException(
                f"no cqrskit data in {settings.data_dir.resolve()} (no command.db there); "
                "pass --data-dir or set CQRSKIT_DATA_DIR to where `cqrskit serve` keeps it"
            )

        async def go() -> T:
            runtime = await open_runtime(settings)
            try:
                return await fn(runtime, **kwargs)
            finally:
                await runtime.close()

        return _run(go())

    return command


@click.group(epilog=ENVIRONMENT_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cqrskit")
def main() -> None:
    """cqrskit: the CQRS Pattern on Azure reference architecture, as a service.

    Commands go in over HTTP, become events in the command DB, flow through the
    event stream into the update processors, and come out as views that queries
    read. `cqrskit serve` runs all of it in one process on SQLite.
    """


@main.command(epilog=ENVIRONMENT_HELP)
@host_option
@port_option
@data_dir_option
def serve(host: str | None, port: int | None, data_dir: Path | None) -> None:
    """Run the API, command handler, update processor and query handler in one process.

    The API is at http://HOST:PORT/api, its schema at /docs, health at /healthz.
    """
    import uvicorn

    from cqrskit.api.app import create_app

    settings = _settings(data_dir, host=host, port=port)
    _refuse_exposed(settings)
    _setup(settings, "serve")
    try:
        app = create_app(settings)
    except CqrskitError as error:
        raise click.ClickException(str(error)) from None
    console.print(
        f"cqrskit serving on http://{settings.host}:{settings.port} "
        f"(data in {settings.data_dir.resolve()}); API docs at /docs",
        highlight=False,
    )
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        access_log=False,
    )


def _refuse_exposed(settings: Settings) -> None:
    """Secure default: listening beyond loopback needs CQRSKIT_AUTH (see docs/security.md)."""
    from cqrskit.api.auth import refuse_exposed_without_auth

    try:
        refuse_exposed_without_auth(settings)
    except CqrskitError as error:
        raise click.ClickException(str(error)) from None


# ------------------------------------------------------------ separate roles


def _role_settings(role: str) -> Settings:
    """A separate role is configured only by environment (CQRSKIT_*)."""
    settings = Settings()
    _setup(settings, role)
    return settings


async def _run_until_signal(settings: Settings, role: str) -> None:
    """Open a runtime for `role`, run it until SIGTERM or SIGINT, then close it cleanly."""
    import signal

    from cqrskit.bootstrap import open_runtime

    runtime = await open_runtime(settings, role=role)
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if role == "relay" and runtime.relay is None:
            raise CqrskitError(
                f"the stream {settings.stream!r} needs no relay; set CQRSKIT_STREAM to a broker "
                "(nats://...)"
            )
        runtime.start()
        console.print(
            f"cqrskit {role} running (pid {os.getpid()}): {redact(runtime.describe())}",
            highlight=False,
        )
        await stop.wait()
        console.print(f"cqrskit {role} stopping", highlight=False)
    finally:
        await runtime.close()


@main.command("update-processor", epilog=ENVIRONMENT_HELP)
def update_processor() -> None:
    """Run projections over the partitions this process leases, until SIGTERM or SIGINT.

    Start as many as you like on one query DB: they share the stream's
    partitions fairly through leases, and take over those of a process that
    stops (at once when it stops cleanly, after CQRSKIT_LEASE_TTL when it dies).
    """
    _run(_run_until_signal(_role_settings("update-processor"), "update-processor"))


@main.command("relay", epilog=ENVIRONMENT_HELP)
def relay() -> None:
    """Publish the event log to the broker, one leader at a time, until SIGTERM or SIGINT."""
    _run(_run_until_signal(_role_settings("relay"), "relay"))


def _serve_http(role: str, host: str | None, port: int | None) -> None:
    """Serve the app of one HTTP role with uvicorn until SIGTERM or SIGINT."""
    import uvicorn

    from cqrskit.api.app import create_app

    settings = _settings(None, host=host, port=port)
    _refuse_exposed(settings)
    _setup(settings, role)
    try:
        app = create_app(settings, role=role)
    except CqrskitError as error:
        raise click.ClickException(str(error)) from None
    console.print(
        f"cqrskit {role} on http://{settings.host}:{settings.port} (pid {os.getpid()})",
        highlight=False,
    )
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        access_log=False,
    )


@main.command("api", epilog=ENVIRONMENT_HELP)
@host_option
@port_option
def api(host: str | None, port: int | None) -> None:
    """Take commands and queries over HTTP; the update processors and relay run elsewhere.

    Validates every request itself (same routes, schema and 4xx as `cqrskit serve`).
    With CQRSKIT_COMMAND_HANDLER_URL and/or CQRSKIT_QUERY_HANDLER_URL set it
    forwards what passed to those handler services and opens no store for them;
    otherwise it handles commands and queries in process. Dead-letter routes are
    served only when it handles queries in process (it then has the query DB).
    """
    _serve_http("api", host, port)


@main.command("command-handler", epilog=ENVIRONMENT_HELP)
@host_option
@port_option
def command_handler(host: str | None, port: int | None) -> None:
    """Serve the command routes (POST /api/.../command/NAME) over HTTP, for `cqrskit api`.

    Opens only the command DB (CQRSKIT_COMMAND_DB). Point the API at it with
    CQRSKIT_COMMAND_HANDLER_URL=http://HOST:PORT; run as many as you like.
    Health at /healthz, readiness at /readyz.
    """
    _serve_http("command-handler", host, port)


@main.command("query-handler", epilog=ENVIRONMENT_HELP)
@host_option
@port_option
def query_handler(host: str | None, port: int | None) -> None:
    """Serve the query routes and GET /api/commands/ID over HTTP, for `cqrskit api`.

    Opens the query DB (the views) and the command DB (to check consistency
    tokens and command status); runs no update processor or relay. Point the
    API at it with CQRSKIT_QUERY_HANDLER_URL=http://HOST:PORT; run as many as
    you like. Health at /healthz, readiness at /readyz.
    """
    _serve_http("query-handler", host, port)


@main.command("up", epilog=ENVIRONMENT_HELP)
@click.option("--distributed", is_flag=True, required=True,
              help="Run each role as its own `cqrskit <role>` OS process.")
@click.option("--host", default=None, help="Address the API listens on [env CQRSKIT_HOST].")
@click.option("--port", type=int, default=None, help="Port of the API [env CQRSKIT_PORT; 8000].")
@click.option("--update-processors", type=click.IntRange(1, 64), default=2, show_default=True,
              help="How many update processor processes to start.")
@click.option("--in-process-handlers", is_flag=True,
              help="Handle commands and queries inside the API process instead of starting "
                   "command-handler and query-handler processes.")
def up(
    distributed: bool, host: str | None, port: int | None, update_processors: int,
    in_process_handlers: bool,
) -> None:
    """Start a whole local topology, each role as its own `cqrskit <role>` OS process.

    The relay (when CQRSKIT_STREAM is a broker), a command handler and a query
    handler (each on a free 127.0.0.1 port), the API on --port forwarding to
    them, and the update processors. Needs stores other processes can share:
    PostgreSQL URLs in CQRSKIT_COMMAND_DB and CQRSKIT_QUERY_DB, and/or a broker
    in CQRSKIT_STREAM. Stops them all on Ctrl-C or SIGTERM.
    """
    settings = _settings(None, host=host, port=port)
    _refuse_exposed(settings)
    process.setup_logging(settings.log_level)
    try:
        topology = _Topology(
            settings, update_processors=update_processors,
            in_process_handlers=in_process_handlers,
        )
    except CqrskitError as error:
        raise click.ClickException(str(error)) from None
    raise SystemExit(topology.run(console.print))


def _free_port() -> int:
    """A port free on 127.0.0.1 now; the child binds it a moment later."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Child:
    role: str
    process: subprocess.Popen[bytes]
    url: str = ""  # where an HTTP role listens


class _Topology:
    """`cqrskit up --distributed`: each role as a child `cqrskit <role>` OS process."""

    def __init__(
        self, settings: Settings, *, update_processors: int, in_process_handlers: bool = False
    ) -> None:
        shared_dbs = not any(
            url.startswith("sqlite:") for url in (settings.command_db_url, settings.query_db_url)
        )
        if not shared_dbs and settings.stream == "embedded":
            raise CqrskitError(
                "cqrskit up --distributed runs separate processes, which need a broker or "
                "shared databases: set CQRSKIT_STREAM=nats://... and/or CQRSKIT_COMMAND_DB and "
                "CQRSKIT_QUERY_DB to postgresql://... URLs. For one process on SQLite, run "
                "`cqrskit serve`."
            )
        self.settings = settings
        self.in_process_handlers = in_process_handlers
        self.update_processors = update_processors
        self.children: list[_Child] = []
        self.stopping = False

    def _spawn(self, role: str, host: str = "", port: int = 0, **env: str) -> _Child:
        """Start `cqrskit <role>`; an HTTP role listens on host:port."""
        import subprocess  # nosec B404 # runs this program's own roles (cqrskit up)
        import sys

        child_env = {**os.environ, **env}
        url = ""
        if port:
            child_env.update(CQRSKIT_HOST=host, CQRSKIT_PORT=str(port))
            url = f"http://{host}:{port}"
        process = subprocess.Popen([sys.executable, "-m", "cqrskit.cli", role], env=child_env)  # nosec B603 # argv is this python -m cqrskit.cli ROLE: no shell, no outside input
        child = _Child(role, process, url)
        self.children.append(child)
        return child

    def _start_all(self) -> None:
        """Relay first, handlers before the API that forwards to them, processors last."""
        if self.settings.stream != "embedded":
            self._spawn("relay")
        # Set even when empty, so a URL exported in the shell does not leak into the API.
        forward = {"CQRSKIT_COMMAND_HANDLER_URL": "", "CQRSKIT_QUERY_HANDLER_URL": ""}
        if not self.in_process_handlers:
            commands = self._spawn("command-handler", "127.0.0.1", _free_port())
            queries = self._spawn("query-handler", "127.0.0.1", _free_port())
            forward = {"CQRSKIT_COMMAND_HANDLER_URL": commands.url,
                       "CQRSKIT_QUERY_HANDLER_URL": queries.url}
        self._spawn("api", self.settings.host, self.settings.port, **forward)
        for _ in range(self.update_processors):
            self._spawn("update-processor")

    def run(self, say: Callable[..., None]) -> int:
        """Start every role, wait until the API is ready, watch them; 0 after a clean stop."""
        import signal
        import time

        def stop(signum: int, frame: Any) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            self._start_all()
            url = f"http://{self.settings.host}:{self.settings.port}"
            # The API is ready once its stores, or the handler services it forwards to, are.
            if not self._wait_ready(url + "/readyz"):
                return 1
            say(f"cqrskit distributed topology is up; API on {url}/api (docs at {url}/docs)",
                highlight=False, soft_wrap=True)
            for child in self.children:
                say(f"  {child.role:<17} pid {child.process.pid:<8} {child.url}".rstrip(),
                    highlight=False, soft_wrap=True)
            say(f"  command DB {redact(self.settings.command_db_url)}\n  query DB   "
                f"{redact(self.settings.query_db_url)}\n  stream     "
                f"{redact(self.settings.stream)}\n"
                "Ctrl-C or SIGTERM stops them all.", highlight=False, soft_wrap=True)
            while not self.stopping:
                for child in self.children:
                    if child.process.poll() is not None:
                        say(f"{child.role} (pid {child.process.pid}) exited with "
                            f"{child.process.returncode}; stopping the others",
                            highlight=False, soft_wrap=True)
                        return 1
                time.sleep(0.2)
            return 0
        finally:
            self._stop_all(say)

    def _wait_ready(self, url: str, timeout: float = 60.0) -> bool:
        import time
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while not self.stopping and time.monotonic() < deadline:
            if any(child.process.poll() is not None for child in self.children):
                return False
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:  # nosec B310 # an http:// URL built from the API's own host and port
                    if answer.status == 200:
                        return True
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        return False

    def _stop_all(self, say: Callable[..., None]) -> None:
        """SIGTERM every child (each stops cleanly: leases released), SIGKILL laggards."""
        import subprocess  # nosec B404 # runs this program's own roles (cqrskit up)

        for child in self.children:
            if child.process.poll() is None:
                child.process.terminate()
        for child in self.children:
            try:
                child.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                say(f"{child.role} (pid {child.process.pid}) did not stop in 20s; killing it",
                    highlight=False, soft_wrap=True)
                child.process.kill()
                child.process.wait()
        if self.children:
            say("cqrskit distributed topology stopped", highlight=False, soft_wrap=True)


@main.group()
def projections() -> None:
    """List projections and rebuild their views from the event log."""


@projections.command("list")
@data_dir_option
@with_runtime
async def projections_list(runtime: Any) -> None:
    """Each projection's checkpoint in every partition.

    With more than one partition, "behind" counts from the end of the whole log,
    so it is an upper bound for one partition.
    """
    last = await runtime.store.last_position()
    checkpoints = await runtime.views.checkpoints()
    table = Table("projection", "partition", "checkpoint", "behind", "collections")
    for name, projection in runtime.registry.projections.items():
        for partition in range(runtime.stream.partitions):
            position = checkpoints.get((name, partition), 0)
            table.add_row(
                name, str(partition), str(position), str(last - position),
                ", ".join(c.name for c in projection.collections),
            )
    console.print(table)


@projections.command("rebuild")
@click.argument("name")
@data_dir_option
@with_runtime
async def projections_rebuild(runtime: Any, name: str) -> None:
    """Empty the views of projection NAME and replay the whole log into them.

    Safe while `cqrskit serve` runs on the same files: the running server sees
    the checkpoint go back and follows the rebuild.
    """
    from cqrskit.update_processor import RetryPolicy, rebuild

    projection = runtime.registry.projection(name)
    if runtime.stream.partitions > 1:
        raise click.ClickException(
            "rebuild replays the event log itself: stop the update processors, then run "
            "this with CQRSKIT_STREAM=embedded against the same databases"
        )
    if await runtime.views.leases():
        raise click.ClickException(
            "update processors hold partition leases (see `cqrskit leases`): stop them "
            "first, or they would apply their partitions a second time"
        )
    until = await runtime.store.last_position()
    with Progress(
        TextColumn(f"rebuilding {name}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("events"), TimeRemainingColumn(), console=console,
    ) as progress:
        task = progress.add_task(name, total=until)
        position = await rebuild(
            projection, runtime.registry, runtime.views, runtime.stream, until,
            retry=RetryPolicy(runtime.settings.retry_attempts, runtime.settings.retry_backoff),
            progress=lambda p: progress.update(task, completed=min(p, until)),
        )
    console.print(f"{name}: rebuilt up to position {position}")


@main.command("status")
@click.option("--watch", type=click.FloatRange(min=0.2), default=None, metavar="SECONDS",
              help="Redraw every SECONDS until Ctrl-C.")
@data_dir_option
@with_runtime
async def status(runtime: Any, watch: float | None) -> None:
    """How far the views lag behind the log, per projection and partition; dead letters.

    The same figures as the dashboard at / and the lag metrics at /metrics.
    """
    from rich.live import Live

    if watch is None:
        console.print(_status_table(await runtime.read_status()))
        return
    with Live(console=console, auto_refresh=False) as live:
        while True:
            live.update(_status_table(await runtime.read_status()), refresh=True)
            await asyncio.sleep(watch)


def _status_table(status: dict[str, Any]) -> Table:
    parked = sum(status["dead_letters"].values())
    table = Table(
        "projection", "partition", "checkpoint", "events behind", "seconds behind", "owner",
        title=f"log at position {status['last_position']}; {parked} dead letters",
    )
    for lag in status["lags"]:
        table.add_row(
            lag["projection"], str(lag["partition"]), str(lag["checkpoint"]),
            ("" if lag["exact"] else "~") + str(lag["events"]), f"{lag['seconds']:.1f}",
            status["leases"].get(str(lag["partition"]), "-"),
        )
    return table


@main.command("leases")
@data_dir_option
@with_runtime
async def leases_list(runtime: Any) -> None:
    """Which update processor owns which partition now (unexpired leases)."""
    held = await runtime.views.leases()
    if not held:
        console.print("no partition leases (no `cqrskit update-processor` running)")
        return
    table = Table("partition", "owner")
    for partition, owner in sorted(held.items()):
        table.add_row(str(partition), owner)
    console.print(table)


@main.group("dead-letters")
def dead_letters() -> None:
    """Events a projection could not apply, parked with the later events of their stream."""


@dead_letters.command("list")
@click.option("--projection", default=None, help="Only this projection's dead letters.")
@data_dir_option
@with_runtime
async def dead_letters_list(runtime: Any, projection: str | None) -> None:
    """Parked events, oldest first per projection."""
    if projection is not None:
        runtime.registry.projection(projection)
    letters = await runtime.views.list_dead_letters(projection)
    if not letters:
        console.print("no dead letters")
        return
    table = Table("id", "projection", "stream", "version", "position", "type", "cause", "error")
    for d in letters:
        table.add_row(
            str(d.id), d.projection, d.stream_id, str(d.envelope.version), str(d.position),
            d.envelope.type, "yes" if d.is_cause else "queued", d.error,
        )
    console.print(table)


@dead_letters.command("retry")
@click.argument("dead_letter_id", type=int)
@data_dir_option
@with_runtime
async def dead_letters_retry(runtime: Any, dead_letter_id: int) -> None:
    """Re-apply the parked events of DEAD_LETTER_ID's stream, oldest first."""
    from cqrskit.update_processor import retry_dead_letters

    outcome = await retry_dead_letters(runtime.registry, runtime.views, dead_letter_id)
    console.print(f"applied {outcome.applied}; {outcome.remaining} still parked")
    if outcome.error:
        raise click.ClickException(f"the head event failed again: {outcome.error}")


@dead_letters.command("skip")
@click.argument("dead_letter_id", type=int)
@data_dir_option
@with_runtime
async def dead_letters_skip(runtime: Any, dead_letter_id: int) -> None:
    """Drop DEAD_LETTER_ID for good: its projection will never apply that event."""
    from cqrskit.update_processor import skip_dead_letter

    d = await skip_dead_letter(runtime.views, dead_letter_id)
    console.print(f"skipped {d.envelope.type} {d.stream_id} v{d.envelope.version}")


# ------------------------------------------------------------------- settings


@main.group()
def config() -> None:
    """Show the settings a process started here would use."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def config_show(as_json: bool) -> None:
    """Every setting's effective value and where it came from (env or default).

    Secrets are shown as ***: secret settings, passwords in URLs, keys in
    connection strings and query strings, tokens and API keys.
    """
    import json

    from pydantic import ValidationError

    from cqrskit.config_report import report

    try:
        entries = report(Settings())
    except ValidationError as error:
        # The error quotes the bad values, which may hold a secret.
        raise click.ClickException(redact(str(error))) from None
    if as_json:
        click.echo(json.dumps(
            {e.variable: {"value": e.value, "source": e.source} for e in entries}, indent=2))
        return
    table = Table("variable", "value", "source")
    table.columns[0].no_wrap = True
    table.columns[1].overflow = "fold"
    for e in entries:
        table.add_row(e.variable, "" if e.value is None else str(e.value), e.source)
    console.print(table)


# ------------------------------------------------------------------- API keys

keys_file_option = click.option(
    "--keys-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="The API keys file [env CQRSKIT_API_KEYS_FILE].",
)


def _api_keys(keys_file: Path | None) -> ApiKeys:
    from cqrskit.api.auth import ApiKeys

    path = keys_file or Settings().api_keys_file
    if path is None:
        raise click.ClickException("pass --keys-file or set CQRSKIT_API_KEYS_FILE")
    return ApiKeys(path)


@main.group()
def keys() -> None:
    """Create, list and revoke API keys (used when CQRSKIT_AUTH includes keys).

    The file holds only a hash of each key; a key is shown once, when created.
    Servers re-read the file when it changes: a revoked key stops working at once.
    """


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(["commands:write", "queries:read", "admin"]),
              help="A scope the key grants; repeat for more.")
@click.option("--tenant", default=None,
              help="The tenant whose data the key reaches (default: the default tenant).")
@keys_file_option
def keys_create(
    name: str, scopes: tuple[str, ...], tenant: str | None, keys_file: Path | None
) -> None:
    """Create a key and print it once (it is not stored; keep it now)."""
    store = _api_keys(keys_file)
    try:
        record, key = store.create(name, list(scopes), tenant)
    except CqrskitError as error:
        raise click.ClickException(str(error)) from None
    click.echo(key)
    click.echo(f"created key {record['id']} ({name}: {', '.join(record['scopes'])}; "
               f"tenant {record.get('tenant', 'default')}); it is shown only now", err=True)


@keys.command("list")
@keys_file_option
def keys_list(keys_file: Path | None) -> None:
    """Every key's id, name, tenant, scopes and state; never the secrets."""
    records = _api_keys(keys_file).records()
    if not records:
        console.print("no API keys")
        return
    table = Table("id", "name", "tenant", "scopes", "created", "revoked")
    for record in records.values():
        table.add_row(record["id"], record["name"], record.get("tenant") or DEFAULT,
                      " ".join(record["scopes"]), record["created_at"],
                      record["revoked_at"] or "-")
    console.print(table)


@keys.command("revoke")
@click.argument("key_id")
@keys_file_option
def keys_revoke(key_id: str, keys_file: Path | None) -> None:
    """Revoke the key KEY_ID for good."""
    try:
        record = _api_keys(keys_file).revoke(key_id)
    except CqrskitError as error:
        raise click.ClickException(str(error)) from None
    console.print(f"revoked key {record['id']} ({record['name']})", highlight=False)


if __name__ == "__main__":  # `python -m cqrskit.cli`: how `cqrskit up` starts its roles
    main()
