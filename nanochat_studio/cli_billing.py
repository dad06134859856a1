"""The money commands of ``nanochat-studio``: credits (hosted) and device-hour allowances (lab), and
the ledger's audit and settlement. Every change goes through billing.py, the only path to money.

    nanochat-studio credits grant alice@example.org 50 --reason "workshop"
    nanochat-studio credits show alice@example.org
    nanochat-studio billing audit        # exits 1 on any broken ledger invariant

cli.py adds these groups to ``main``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from .cli_context import Context, clean_errors, opened_store, pass_ctx, user_by_email


@click.group("credits")
def credits_group() -> None:
    """Grant, revoke and read credits (hosted) or set device-hour allowances (lab)."""


def _billing_call(fn: Callable[[], Any]) -> Any:
    from .errors import AppError

    try:
        return fn()
    except AppError as exc:
        raise click.ClickException(exc.message) from None


def _move_credits(obj: Context, email: str, move: Callable[[Any], Any], done: str) -> None:
    """Grant or revoke: ``move(user)`` through billing, then say ``done`` and what the account has now."""
    with opened_store(obj.settings()):
        user = user_by_email(email)
        _billing_call(lambda: move(user))
        click.echo(f"{done} {user.email}; available now {_available(user.id)}")


@credits_group.command("grant")
@click.argument("email")
@click.argument("credits")
@click.option("--reason", required=True, help="Why: the ledger line the person reads.")
@pass_ctx
@clean_errors
def credits_grant(obj: Context, email: str, credits: str, reason: str) -> None:
    """Give EMAIL's account CREDITS credits."""
    from . import billing

    _move_credits(obj, email, lambda user: billing.grant(user, credits, reason), f"granted {credits} credits to")


@credits_group.command("revoke")
@click.argument("email")
@click.argument("credits")
@click.option("--reason", required=True, help="Why: the ledger line the person reads.")
@pass_ctx
@clean_errors
def credits_revoke(obj: Context, email: str, credits: str, reason: str) -> None:
    """Take CREDITS credits back from EMAIL's available credits."""
    from . import billing

    _move_credits(obj, email, lambda user: billing.revoke(user, credits, reason), f"revoked {credits} credits from")


@credits_group.command("show")
@click.argument("email")
@click.option("--limit", type=int, default=20, show_default=True, help="Ledger lines to print.")
@pass_ctx
@clean_errors
def credits_show(obj: Context, email: str, limit: int) -> None:
    """Print EMAIL's balance and latest ledger lines."""
    from .billing import ledger

    with opened_store(obj.settings()):
        user = user_by_email(email)
        b = ledger.balances(user.id)
        click.echo(f"{user.email}: available {ledger.credits_text(b['available'])}, "
                   f"held {ledger.credits_text(b['held'])}, balance {ledger.credits_text(b['balance'])}")
        for line in ledger.user_lines(user.id, limit=limit):
            click.echo(f"{line['created_at']:%Y-%m-%d %H:%M}\t{line['kind']}\t"
                       f"{ledger.credits_text(line['available'])}\t{ledger.credits_text(line['held'])}\t"
                       f"{line['description']}")


@credits_group.command("allowance")
@click.argument("email")
@click.argument("hours")
@pass_ctx
@clean_errors
def credits_allowance(obj: Context, email: str, hours: str) -> None:
    """Lab mode: give EMAIL HOURS device-hours a month (`off`: no quota)."""
    from . import billing

    try:
        value = None if hours.lower() in ("off", "none") else float(hours)
    except ValueError:
        raise click.ClickException(f"HOURS must be a number or off, got {hours!r}") from None
    with opened_store(obj.settings()):
        user = user_by_email(email)
        _billing_call(lambda: billing.set_allowance(user, value))
        click.echo(f"{user.email}: " + ("no quota" if value is None else f"{value:g} device-hours a month"))


@credits_group.command("refund-job")
@click.argument("job_id", type=int)
@click.option("--reason", required=True, help="Why: the ledger line the person reads.")
@pass_ctx
@clean_errors
def credits_refund_job(obj: Context, job_id: int, reason: str) -> None:
    """Give back what a settled job was charged."""
    from . import billing
    from .billing import ledger

    with opened_store(obj.settings()):
        amount = _billing_call(lambda: billing.refund_job(job_id, reason))
        click.echo(f"job {job_id} refunded: {ledger.credits_text(amount)} credits returned")


def _available(user_id: int) -> str:
    from .billing import ledger

    return ledger.credits_text(ledger.balances(user_id)["available"])


@click.group("billing")
def billing_group() -> None:
    """Check and settle the ledger."""


@billing_group.command("audit")
@pass_ctx
@clean_errors
def billing_audit(obj: Context) -> None:
    """Recompute the ledger; exit 1 and list every broken invariant, if any."""
    from .billing import ledger

    with opened_store(obj.settings()):
        problems = ledger.audit()
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        raise click.ClickException(f"the ledger audit found {len(problems)} problem(s)")
    click.echo("ledger ok: every transaction balances, every cached balance matches, every job is held once "
               "and settled once")


@billing_group.command("settle")
@pass_ctx
@clean_errors
def billing_settle(obj: Context) -> None:
    """Meter and settle jobs whose settlement is pending (the worker does this on every tick)."""
    from . import billing

    with opened_store(obj.settings()):
        settled = billing.reconcile()
    click.echo(f"settled {len(settled)} job(s)" + (f": {', '.join(map(str, settled))}" if settled else ""))
