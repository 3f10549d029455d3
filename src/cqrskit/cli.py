"""The `cqrskit` command line: serve the API, and operate projections and dead letters."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cqrskit.config import Settings, environment_help
from cqrskit.errors import CqrskitError

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


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
@click.option("--host", default=None, help="Address to listen on [env CQRSKIT_HOST; 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [env CQRSKIT_PORT; 8000].")
@data_dir_option
def serve(host: str | None, port: int | None, data_dir: Path | None) -> None:
    """Run the API, command handler, update processor and query handler in one process.

    The API is at http://HOST:PORT/api, its schema at /docs, health at /healthz.
    """
    import uvicorn

    from cqrskit.api.app import create_app

    settings = _settings(data_dir, host=host, port=port)
    _setup_logging(settings.log_level)
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


@main.group()
def projections() -> None:
    """List projections and rebuild their views from the event log."""


@projections.command("list")
@data_dir_option
@with_runtime
async def projections_list(runtime: Any) -> None:
    """Each projection with its checkpoint and how far behind the log it is."""
    last = await runtime.store.last_position()
    checkpoints = await runtime.views.checkpoints()
    table = Table("projection", "partition", "checkpoint", "behind", "collections")
    for name, projection in runtime.registry.projections.items():
        position = checkpoints.get((name, 0), 0)
        table.add_row(
            name, "0", str(position), str(last - position),
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
