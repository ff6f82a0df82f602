"""The command line: parse options, call one function, map errors to exit codes.

Results go to stdout; logs go to stderr. An expected failure is one line,
`Error: ...`, and an exit code; `--traceback` shows the stack as well.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from etl import backfill as backfill_module
from etl import config as config_module
from etl import demo as demo_module
from etl import html_report, report, rollup, schedule, store
from etl.config import LONGEST_DURATION, LONGEST_WAIT, Config
from etl.errors import EtlError
from etl.sync import Filters, run_sync

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
# `status --max-age`: the newest good sync is too old, or there is none.
EXIT_STALE = 5

# A report reaches back at most a century, and not before the epoch: earlier,
# the period's start overflowed Python's dates in a traceback.
LONGEST_REPORT_DAYS = 36_500
EARLIEST_SINCE = datetime(1970, 1, 1)
# More runs than anyone reads; past 2**63 SQLite's LIMIT overflowed.
MOST_RUNS_SHOWN = 1_000_000

# PySocks ("socks") logs the proxy's address at every failed connection.
QUIET_LOGGERS = ("sqlalchemy.engine", "apscheduler", "urllib3", "alembic", "socks")


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan, which passes its comparisons and
    then crashed the command in a traceback."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


class Context:
    def __init__(self, config_path: str | None, traceback: bool) -> None:
        self.config_path = config_path
        self.traceback = traceback

    def config(self, *, tokens: bool = True) -> Config:
        """The configuration; `tokens=False` for commands that never call the
        platform, so that they run without its secret."""
        path = config_module.resolve_path(self.config_path)
        return config_module.load(path, tokens=tokens)


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


def say(text: str, *, err: bool = False) -> None:
    """Print the command's words, if anything still reads them.

    A terminal closed mid-run, or a reader gone (`| head`), failed the print
    of a run's summary after the run was done and recorded: the command
    exited 1 with a traceback instead of its own code. The stream then goes
    to /dev/null, so that nothing printed after it fails too. A stream
    closed from the start is None to Python, and takes nothing.
    """
    stream = sys.stderr if err else sys.stdout
    if stream is None:  # closed before the command started (`>&-`)
        return
    try:
        click.echo(text, err=err)  # which flushes: a gone reader fails here
    except OSError as exc:
        if exc.errno not in (errno.EIO, errno.EPIPE):
            raise
        nowhere = os.open(os.devnull, os.O_WRONLY)
        os.dup2(nowhere, stream.fileno())
        os.close(nowhere)


def run_command(ctx: click.Context, action: Callable[[], int]) -> NoReturn:
    """Run a command body, turning our errors into one line and an exit code."""
    context: Context = ctx.obj
    try:
        code = action()
    except EtlError as exc:
        if context.traceback:
            log.exception("traceback")
        say(f"Error: {exc}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        say("Interrupted.", err=True)
        code = 130
    ctx.exit(code)


@main.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Bring the database to the current schema."""

    def action() -> int:
        config = ctx.obj.config(tokens=False)
        engine = store.connect(config.database)
        before, after = store.migrate(engine)
        # Builds the daily counts of a history older than the schema, and
        # recounts them when api.timezone changed.
        rollup.refresh_daily_counts(engine, config.api.zone)
        if before == after:
            say(f"Database already at the current schema ({after}).")
        else:
            say(f"Database migrated from {before or 'empty'} to {after}.")
        return EXIT_OK

    run_command(ctx, action)


@main.command()
@click.pass_context
def sync(ctx: click.Context) -> None:
    """Sync every configured account once, then exit.

    Exit codes: 0 success, 1 failure (or past schedule.deadline), 2 bad
    configuration, 3 some accounts failed (the others were stored), 4
    another run held the lock of some account, which was skipped (nothing
    failed), 130 stopped by Ctrl-C, SIGTERM or SIGHUP after the pages being
    written (a second signal exits at once).
    """

    def action() -> int:
        config = ctx.obj.config()
        stop = threading.Event()
        with schedule.stop_on_signals(stop):
            summary = run_sync(config, stop=stop, deadline=config.schedule.deadline)
        say(report.describe_run(summary))
        return summary.exit_code

    run_command(ctx, action)


@main.command()
@click.pass_context
def daemon(ctx: click.Context) -> None:
    """Sync on the [schedule] of the configuration until stopped.

    SIGTERM, SIGHUP or Ctrl-C stops it after the pages being written: the
    run is recorded as "stopped" and the exit code is 0. A second signal
    exits at once (143, 129 or 130); nothing written is lost, and the next
    run marks the cut run abandoned.
    """

    def action() -> int:
        config = ctx.obj.config()
        # The daemon reports skipped and missed runs itself, in our words.
        apscheduler = logging.getLogger("apscheduler")
        apscheduler.setLevel(max(apscheduler.getEffectiveLevel(), logging.ERROR))
        return schedule.run_daemon(config)

    run_command(ctx, action)


@main.command()
@click.option(
    "--account",
    "selectors",
    multiple=True,
    metavar="USER[:SUB]",
    help="A main account with its sub-accounts, or USER:SUB for one "
    "sub-account; repeatable [default: every account].",
)
@click.option("--name", help="Only tasks the platform's name filter matches.")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.IntRange(1, 3),
    metavar="1|2|3",
    help="Only tasks in this status (1 paused, 2 running, 3 waiting); repeatable.",
)
@click.option(
    "--from-archive",
    "archive_dir",
    metavar="DIR",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Replay the pages archived in DIR instead of calling the platform.",
)
@click.pass_context
def backfill(
    ctx: click.Context,
    selectors: tuple[str, ...],
    name: str | None,
    statuses: tuple[int, ...],
    archive_dir: Path | None,
) -> None:
    """Pull the chosen accounts in full once, or replay an archive.

    A pull filtered by --name or --status never marks a task removed. A
    replay stores archived pages with the times they were fetched and skips
    walks no newer than the account's last sync, so it can be repeated.
    Progress is shown on a terminal only.

    Exit codes: 0 success, 1 failure, 2 bad usage or configuration, 3 some
    accounts failed (the others were stored), 4 another run held the lock of
    some account, which was skipped (nothing failed), 130 stopped by a signal.
    """
    if archive_dir is not None and (name is not None or statuses):
        raise click.UsageError("--name and --status cannot be used with --from-archive")

    def action() -> int:
        config = ctx.obj.config(tokens=archive_dir is None)
        stop = threading.Event()
        if archive_dir is not None:
            with (
                schedule.stop_on_signals(stop),
                report.ProgressLine(sys.stderr, "replay") as progress,
            ):
                replayed = backfill_module.replay_archive(
                    config,
                    archive_dir,
                    selectors=selectors,
                    progress=progress,
                    stop=stop,
                )
            say(report.describe_replay(replayed))
            return replayed.exit_code
        with (
            schedule.stop_on_signals(stop),
            report.ProgressLine(sys.stderr, "backfill") as progress,
        ):
            summary = backfill_module.run_backfill(
                config,
                selectors=selectors,
                filters=Filters(name=name, statuses=statuses),
                progress=progress,
                stop=stop,
            )
        say(report.describe_run(summary))
        return summary.exit_code

    run_command(ctx, action)


@main.command()
@click.option(
    "--limit",
    default=10,
    show_default=True,
    type=click.IntRange(1, MOST_RUNS_SHOWN),
    help="How many runs.",
)
@click.option(
    "--max-age",
    metavar="DURATION",
    callback=lambda _ctx, _param, value: _max_age(value),
    help="Exit 5 when the newest good sync is older than this (90s, 30m, 2h, "
    "1d) or there is none: a check for monitoring.",
)
@click.option(
    "--max-complete-age",
    metavar="DURATION",
    callback=lambda _ctx, _param, value: _max_age(value),
    help="Exit 5 when some account's last complete walk, the only kind that "
    "finds removals, is older than this or there is none.",
)
@click.pass_context
def status(
    ctx: click.Context,
    limit: int,
    max_age: timedelta | None,
    max_complete_age: timedelta | None,
) -> None:
    """Recent runs, failing accounts and the age of the last good sync."""

    def action() -> int:
        config = ctx.obj.config(tokens=False)
        engine = store.connect(config.database, read_only=True)
        store.check_schema(engine)
        say(report.describe_status(engine, limit))
        main_user_ids = [main.user_id for main in config.accounts]
        checks = [
            (max_age, report.GOOD_SYNC),
            (max_complete_age, report.COMPLETE_WALK),
        ]
        problems = [
            report.check_freshness(
                engine, age, main_user_ids=main_user_ids, freshness=freshness
            )
            for age, freshness in checks
            if age is not None
        ]
        for problem in filter(None, problems):
            say(f"Error: {problem}", err=True)
        return EXIT_STALE if any(problems) else EXIT_OK

    run_command(ctx, action)


def _max_age(value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return report.parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command("report")
@click.option(
    "--days",
    type=click.IntRange(1, LONGEST_REPORT_DAYS),
    help=f"The last DAYS days [default: {html_report.DEFAULT_DAYS}].",
)
@click.option(
    "--since",
    metavar="DATE",
    callback=lambda _ctx, _param, value: _since(value),
    help="From DATE instead: YYYY-MM-DD or 'YYYY-MM-DD HH:MM', in api.timezone.",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write one self-contained HTML page with charts to this file.",
)
@click.pass_context
def report_command(
    ctx: click.Context, days: int | None, since: Any, html_path: Path | None
) -> None:
    """Tasks per status per account now, and what changed in a period."""
    if days is not None and since is not None:
        raise click.UsageError("give --days or --since, not both")

    def action() -> int:
        config = ctx.obj.config(tokens=False)
        start = since.replace(tzinfo=config.api.zone) if since else None
        if start is not None and start > datetime.now(UTC):
            # An empty period, and past year 9999 a traceback.
            message = f"{start:%Y-%m-%d %H:%M} is in the future ({config.api.timezone})"
            raise click.BadParameter(message, param_hint="'--since'")
        say(html_report.run_report(config, days=days, since=start, html_path=html_path))
        return EXIT_OK

    run_command(ctx, action)


def _since(value: str | None) -> Any:
    if value is None:
        return None
    for layout in ("%Y-%m-%d", "%Y-%m-%d %H:%M"):
        try:
            since = datetime.strptime(value, layout)
        except ValueError:
            continue
        if since < EARLIEST_SINCE:
            raise click.BadParameter(f"{value!r} is before 1970-01-01")
        return since
    raise click.BadParameter(f"{value!r} is not YYYY-MM-DD or 'YYYY-MM-DD HH:MM'")


@main.command()
@click.option(
    "--port",
    default=8800,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port on 127.0.0.1 (0: any free one).",
)
@click.option("--seed", default=1, show_default=True, help="Seed of the world.")
@click.option(
    "--main-accounts", default=2, show_default=True, type=click.IntRange(min=1)
)
@click.option(
    "--sub-accounts",
    default=2,
    show_default=True,
    type=click.IntRange(min=0),
    help="Per main.",
)
@click.option(
    "--tasks",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="Per account.",
)
@click.option("--token", default="sim-token", show_default=True)
@click.option(
    "--tick",
    default=0.0,
    show_default=True,
    type=FiniteRange(0, LONGEST_WAIT),
    help="Every TICK real seconds, advance simulated time by STEP (0: never).",
)
@click.option(
    "--step",
    default=300.0,
    show_default=True,
    type=FiniteRange(0, LONGEST_DURATION),
    help="Seconds per tick.",
)
@click.option(
    "--fault",
    "fault_rates",
    multiple=True,
    metavar="KIND=RATE",
    help="Misbehave on this share of requests; repeatable. KIND: throttle, "
    "server_error, reset, truncated, bad_code, unauthorized, stall.",
)
@click.option("--fault-seed", default=0, show_default=True, help="Replays faults.")
@click.option(
    "--retry-after", default=1, show_default=True, help="Seconds a 429 asks for."
)
@click.option(
    "--stall",
    default=35.0,
    show_default=True,
    type=FiniteRange(0, LONGEST_WAIT, min_open=True),
    help="Seconds a stalled response holds; above the client's read timeout.",
)
@click.option(
    "--refuse-account",
    default="",
    metavar="USER_ID",
    help="The main account whose token `unauthorized` refuses [default: any].",
)
@click.pass_context
def simulate(ctx: click.Context, /, **options: Any) -> None:
    """Serve a local stand-in of the platform's API on 127.0.0.1."""
    from etl import simulator
    from etl.faults import Faults

    def action() -> int:
        try:
            faults = Faults.parse(
                options["fault_rates"],
                seed=options["fault_seed"],
                retry_after=options["retry_after"],
                stall_seconds=options["stall"],
                refused_user_id=options["refuse_account"],
            )
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--fault") from None
        try:
            simulator.run(
                seed=options["seed"],
                port=options["port"],
                tick=options["tick"],
                step=options["step"],
                main_accounts=options["main_accounts"],
                sub_accounts=options["sub_accounts"],
                tasks_per_account=options["tasks"],
                token=options["token"],
                faults=faults,
            )
        except OSError as exc:
            message = f"cannot listen on 127.0.0.1:{options['port']}: {exc.strerror}"
            raise click.BadParameter(message, param_hint="--port") from None
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
    """Simulator + migrate + three syncs into a local SQLite file, with a summary."""

    def action() -> int:
        say(demo_module.run_demo(path))
        return EXIT_OK

    run_command(ctx, action)
