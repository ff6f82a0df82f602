"""Accounts: a main user, or one of its sub-accounts."""

from __future__ import annotations

from dataclasses import dataclass

# The longest id the database's id columns hold, for tasks, groups and
# accounts alike.
ID_LENGTH = 200


@dataclass(frozen=True)
class Account:
    """The pair `user_id` + `sub_user_id`; the main account has an empty sub id."""

    user_id: str
    sub_user_id: str = ""
    name: str = ""
    origin: str = "configured"

    @property
    def is_main(self) -> bool:
        return not self.sub_user_id

    @property
    def label(self) -> str:
        """How logs and messages name the account: `user` or `user:sub`."""
        return (
            f"{self.user_id}:{self.sub_user_id}" if self.sub_user_id else self.user_id
        )
