"""The command line: parse options, call one function, map errors to exit codes.

Results go to stdout; logs go to stderr. An expected failure is one line,
`Error: ...`, and an exit code; `--traceback` shows the stack as well.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from etl import config as config_module
from etl import demo as demo_module
from etl import report, store
from etl.config import Config
from etl.errors import EtlError
from etl.sync import run_sync

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

QUIET_LOGGERS = ("sqlalchemy.engine", "apscheduler", "urllib3", "alembic")


class Context:
    def __init__(self, config_path: str | None, traceback: bool) -> None:
        self.config_path = config_path
        self.traceback = traceback

    def config(self) -> Config:
        return config_module.load(config_module.resolve_path(self.config_path))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help="Configuration file [default: $TASK_ETL_CONFIG, else ./task-etl.toml].",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv: SQL too).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--traceback", is_flag=True, help="Show the stack on errors.")
@click.version_option(package_name="task-etl")
@click.pass_context
def main(
    ctx: click.Context,
    config_path: str | None,
    verbose: int,
    quiet: bool,
    traceback: bool,
) -> None:
    """Keep a SQL database in step with the platform's call tasks."""
    setup_logging(verbose, quiet)
    ctx.obj = Context(config_path, traceback)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.INFO
            if verbose > 1 and name == "sqlalchemy.engine"
            else max(level, logging.WARNING)
        )


def run_command(ctx: click.Context, action: Callable[[], int]) -> NoReturn:
    """Run a command body, turning our errors into one line and an exit code."""
    context: Context = ctx.obj
    try:
        code = action()
    except EtlError as exc:
        if context.traceback:
            log.exception("traceback")
        click.echo(f"Error: {exc}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        code = 130
    ctx.exit(code)


@main.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Bring the database to the current schema."""

    def action() -> int:
        config = ctx.obj.config()
        before, after = store.migrate(store.connect(config.database))
        if before == after:
            click.echo(f"Database already at the current schema ({after}).")
        else:
            click.echo(f"Database migrated from {before or 'empty'} to {after}.")
        return EXIT_OK

    run_command(ctx, action)


@main.command()
@click.pass_context
def sync(ctx: click.Context) -> None:
    """Sync every configured account once, then exit.

    Exit codes: 0 success, 1 failure, 2 bad configuration, 3 some accounts
    failed (the others were stored).
    """

    def action() -> int:
        summary = run_sync(ctx.obj.config())
        click.echo(report.describe_run(summary))
        return summary.exit_code

    run_command(ctx, action)


@main.command()
@click.option("--limit", default=10, show_default=True, help="How many runs.")
@click.pass_context
def status(ctx: click.Context, limit: int) -> None:
    """Recent runs, failing accounts and the age of the last good sync."""

    def action() -> int:
        config = ctx.obj.config()
        engine = store.connect(config.database)
        store.check_schema(engine)
        click.echo(report.describe_status(engine, limit))
        return EXIT_OK

    run_command(ctx, action)


@main.command()
@click.option("--port", default=8800, show_default=True, help="Port on 127.0.0.1.")
@click.option("--seed", default=1, show_default=True, help="Seed of the world.")
@click.option("--main-accounts", default=2, show_default=True)
@click.option("--sub-accounts", default=2, show_default=True, help="Per main.")
@click.option("--tasks", default=20, show_default=True, help="Per account.")
@click.option("--token", default="sim-token", show_default=True)
@click.option(
    "--tick",
    default=0.0,
    show_default=True,
    help="Every TICK real seconds, advance simulated time by STEP (0: never).",
)
@click.option("--step", default=300.0, show_default=True, help="Seconds per tick.")
@click.pass_context
def simulate(ctx: click.Context, /, **options: Any) -> None:
    """Serve a local stand-in of the platform's API on 127.0.0.1."""
    from etl import simulator

    def action() -> int:
        click.echo(
            f"Simulator on http://127.0.0.1:{options['port']} "
            f"(token {options['token']!r}); main accounts are printed below. "
            "Ctrl-C stops it.",
            err=True,
        )
        simulator.run(
            seed=options["seed"],
            port=options["port"],
            tick=options["tick"],
            step=options["step"],
            main_accounts=options["main_accounts"],
            sub_accounts=options["sub_accounts"],
            tasks_per_account=options["tasks"],
            token=options["token"],
        )
        return EXIT_OK

    run_command(ctx, action)


@main.command()
@click.option(
    "--database",
    "path",
    default="task-etl-demo.db",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite file to create (replaced if it exists).",
)
@click.pass_context
def demo(ctx: click.Context, path: Path) -> None:
    """Simulator + migrate + two syncs into a local SQLite file, with a summary."""

    def action() -> int:
        click.echo(demo_module.run_demo(path))
        return EXIT_OK

    run_command(ctx, action)
