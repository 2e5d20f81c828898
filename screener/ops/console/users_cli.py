"""``screener users add|list|disable|enable|passwd|role``: console accounts from the command line.

A password is read from standard input (``--password-stdin``: one line) or, on a terminal, asked for twice;
never from the command line, where other users of the host could read it.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from typing import TextIO

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from screener.ops.console import accounts
from screener.ops.console.accounts import AccountError, Role

USER_ACTIONS = ("add", "list", "disable", "enable", "passwd", "role")
READ_ONLY_ACTIONS = ("list",)


def add_users_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_config_option: Callable[[argparse.ArgumentParser, bool], None],
) -> None:
    """The ``users`` command and its actions, on ``sub`` (the ``screener`` command's subparsers)."""
    p = sub.add_parser("users", help="web console accounts: add, list, disable, enable, passwd, role")
    add_config_option(p, False)
    usub = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    roles = [r.value for r in Role]
    a = usub.add_parser(
        "add", help="create an account (viewer: dashboard; reviewer: + studies; admin: + all)"
    )
    add_config_option(a, False)
    a.add_argument("name")
    a.add_argument("--role", choices=roles, required=True)
    a.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add_config_option(usub.add_parser("list", help="accounts, roles and state"), False)
    for action, text in (
        ("disable", "disable an account and end its sessions"),
        ("enable", "enable it again"),
    ):
        d = usub.add_parser(action, help=text)
        add_config_option(d, False)
        d.add_argument("name")
    w = usub.add_parser("passwd", help="set a new password (also unlocks the account, ends its sessions)")
    add_config_option(w, False)
    w.add_argument("name")
    w.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    r = usub.add_parser("role", help="change an account's role (ends its sessions)")
    add_config_option(r, False)
    r.add_argument("name")
    r.add_argument("--role", choices=roles, required=True)


def read_password(from_stdin: bool, stdin: TextIO | None = None) -> str:
    """The new password: one line of ``stdin`` with ``--password-stdin``, else asked twice on a terminal.

    Raises AccountError when neither is possible or the two entries differ."""
    stream = stdin or sys.stdin
    if from_stdin:
        line = stream.readline()
        return line[:-1] if line.endswith("\n") else line
    if not stream.isatty():
        raise AccountError("give the password on standard input with --password-stdin")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        raise AccountError("the two passwords differ: nothing changed")
    return first


def users_command(engine: Engine, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``screener users ACTION``; prints one line (or the list). Raises AccountError."""
    out = out or sys.stdout
    action = args.users_command
    with Session(engine) as session, session.begin():
        if action == "list":
            rows = accounts.list_users(session)
            if not rows:
                print("no accounts: screener users add NAME --role admin --password-stdin", file=out)
            for u in rows:
                state = "disabled" if u.disabled else ("locked" if u.locked_until is not None else "active")
                last = u.last_login_at.isoformat(timespec="seconds") if u.last_login_at else "never"
                print(f"{u.name:<32} {u.role:<9} {state:<9} last sign-in {last}", file=out)
            return 0
        if action == "add":
            user = accounts.add_user(session, args.name, args.role, read_password(args.password_stdin))
            print(f"added {user.name} ({user.role})", file=out)
        elif action == "passwd":
            user = accounts.set_password(session, args.name, read_password(args.password_stdin))
            print(f"password set for {user.name}; its sessions ended", file=out)
        elif action == "disable":
            user = accounts.disable_user(session, args.name)
            print(f"disabled {user.name}; its sessions ended", file=out)
        elif action == "enable":
            user = accounts.enable_user(session, args.name)
            print(f"enabled {user.name}", file=out)
        else:
            user = accounts.set_role(session, args.name, args.role)
            print(f"{user.name} is now {user.role}; its sessions ended", file=out)
        from screener.core import audit

        audit.record(
            session,
            "console.user_changed",
            actor="operator",
            subject=user.name,
            detail={"action": action, "role": user.role, "via": "screener users"},
        )
    return 0
