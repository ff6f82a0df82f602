"""The error tree: every failure the product expects, said in one line.

Each error names where it happened (account, endpoint, page, HTTP status) so
that an operator can act on the message alone. None of them ever carries a
token or a callback URL: messages are built from our own fields, never from
a request URL or a response body.
"""

from __future__ import annotations

import traceback


class EtlError(Exception):
    """Root of every error the product raises on purpose."""

    exit_code = 1

    def __init__(self, message: str = "") -> None:
        # One line, whatever went into it: a file name, a URL or a driver's
        # message may hold a line break, a NUL or a terminal escape sequence.
        super().__init__(printable(message))


def printable(text: str) -> str:
    """`text` with every character a terminal would not show escaped as
    repr() escapes it (\\n, \\x00, \\x1b, \\u202e), as the client quotes
    the platform's messages. Printable text, backslashes too, is unchanged,
    so escaping twice changes nothing."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


class ConfigError(EtlError):
    """The configuration file or environment is unusable."""

    exit_code = 2

    def __init__(self, message: str, *, key: str | None = None, path: str = "") -> None:
        self.key = key
        self.path = path
        where = f"{path}: " if path else ""
        what = f"{key}: " if key else ""
        super().__init__(f"{where}{what}{message}")


class ApiError(EtlError):
    """A call to the platform failed; says which account, endpoint and page."""

    def __init__(
        self,
        message: str,
        *,
        account: str = "",
        endpoint: str = "",
        page: int | None = None,
        status: int | None = None,
    ) -> None:
        self.account = account
        self.endpoint = endpoint
        self.page = page
        self.status = status
        self.reason = message
        super().__init__(self._describe(message))

    def _describe(self, message: str) -> str:
        parts = []
        if self.account:
            parts.append(f"account {self.account}")
        if self.endpoint:
            parts.append(f"endpoint {self.endpoint}")
        if self.page is not None:
            parts.append(f"page {self.page}")
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        where = ", ".join(parts)
        return f"{where}: {message}" if where else message


class RetryableApiError(ApiError):
    """Plausibly transient: a timeout, a reset connection, 429 or 5xx."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        account: str = "",
        endpoint: str = "",
        page: int | None = None,
        status: int | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(
            message, account=account, endpoint=endpoint, page=page, status=status
        )


class FatalApiError(ApiError):
    """Retrying will not help: a 4xx, a refused envelope, a forbidden path."""


class PageLimitError(FatalApiError):
    """A walk went past the hard page cap instead of looping for ever."""


class StoreError(EtlError):
    """The database refused a write or is not at the expected schema."""


class LockTimeoutError(StoreError):
    """A write waited `database.busy_timeout` for a lock another writer held."""


class StopNotRecorded(StoreError):
    """A run was stopped, and the database refused the record of the stop:
    the command still ends as stopped."""

    exit_code = 130


class ArchiveError(EtlError):
    """A file of the raw page archive could not be written or read; names it."""


class AccountLockError(EtlError):
    """About the lock that keeps one writer per account; names the account."""

    def __init__(self, message: str, *, account: str = "") -> None:
        self.account = account
        super().__init__(f"account {account}: {message}" if account else message)


class LockBusyError(AccountLockError):
    """Another run holds the lock on an account, so this run skips it."""

    exit_code = 4


class LockLostError(AccountLockError):
    """A run lost an account's lock while walking it; the account fails."""


class RunInterrupted(EtlError):
    """A stop was requested (signal or deadline) while a run was going."""


class RunNotBegun(RunInterrupted):
    """A stop or the deadline came while a run waited for another writer to
    record its start: nothing was done."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RunAbandoned(RunInterrupted):
    """Another run marked this one abandoned, its heartbeat being older than
    the lease, while its process was only paused, hung, or kept from writing:
    it stops, and writes nothing more."""


def bare_traceback(exc: BaseException) -> str:
    """The stack of an unexpected exception and its type, for the log, without
    its text: that can quote a task's data, a callback URL, or a setting
    that holds a password."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    name = type(exc).__qualname__
    return f"Traceback (most recent call last):\n{frames}{name} (its text left out)"
