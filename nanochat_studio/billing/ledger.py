"""The double-entry ledger: accounts, transactions whose postings sum to zero, balances, and the audit.

Amounts are integer micro-credits (``MICRO`` per credit). Every movement is one :func:`post`: a
transaction under a unique idempotency key (a second post with the same key does nothing and answers
None) whose postings sum to zero, inserted together with the change of each touched account's cached
``balance`` (and of the user's ``credit_balance``) in one database transaction. Rows are never updated
or deleted: db.py's triggers refuse it below the ORM. :func:`audit` recomputes everything.

Locking: a writer takes :func:`write_transaction` (``BEGIN IMMEDIATE`` on SQLite: a transaction that
reads and then writes must hold the write lock from its start) and, before reading a user's balance to
decide anything, :func:`lock_user` (``SELECT ... FOR UPDATE`` of the user's row and accounts on
PostgreSQL). Account rows are updated in id order, so two writers never wait for each other in a cycle.
"""

from __future__ import annotations

import datetime as dt
import math
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Iterable

import peewee as pw

from ..models import (JobBilling, LedgerAccount, LedgerPosting, LedgerTransaction, TrainingJob, User, database,
                      utcnow)

MICRO = 1_000_000
AVAILABLE, HELD, SYSTEM = "available", "held", "system"
# System accounts: where bought credits come from (stripe), where used ones go (revenue), where granted
# ones come from (grants: admins, sign-up) and lab allowances (allowances).
STRIPE, REVENUE, GRANTS, ALLOWANCES = "stripe", "revenue", "grants", "allowances"
SYSTEM_ACCOUNTS = (STRIPE, REVENUE, GRANTS, ALLOWANCES)

# Kinds of transaction, as the ledger lines show them.
PURCHASE, REFUND, DISPUTE, DISPUTE_REVERSAL = "purchase", "refund", "dispute", "dispute_reversal"
GRANT, REVOKE, SIGNUP, ALLOWANCE = "grant", "revoke", "signup", "allowance"
HOLD, HOLD_EXTEND, USAGE, CREDIT_BACK, SETTLE, JOB_REFUND = (
    "hold", "hold_extend", "usage", "credit_back", "settle", "job_refund")


class LedgerError(Exception):
    """A posting that would break the ledger's rules (unbalanced, empty); a bug, never a user's mistake."""


# --- units ---------------------------------------------------------------------------------------------

def to_micro(credits: Any) -> int:
    """Credits (a number or a decimal string) as micro-credits, exactly; ValueError for anything else."""
    if isinstance(credits, bool):
        raise ValueError("credits must be a number")
    try:
        value = Decimal(str(credits).strip())
    except InvalidOperation:
        raise ValueError(f"not a number of credits: {credits!r}") from None
    if not value.is_finite():
        raise ValueError(f"not a number of credits: {credits!r}")
    return int((value * MICRO).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def to_credits(micro: int) -> float:
    return micro / MICRO


def credits_text(micro: int) -> str:
    """``12.5``, ``-0.000123``: as many decimals as it takes, no float noise."""
    text = f"{Decimal(micro) / MICRO:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def cost_micro(device_seconds: float, rate: float) -> int:
    """What ``device_seconds`` cost at ``rate`` micro-credits per device-second, rounded up."""
    return max(0, math.ceil(round(device_seconds * rate, 6)))


# --- transactions and accounts -------------------------------------------------------------------------

def write_transaction() -> Any:
    """A transaction that reads and then writes: on SQLite it takes the write lock at BEGIN (IMMEDIATE),
    so it waits for other writers instead of failing; nested, a savepoint."""
    if isinstance(database.obj, pw.SqliteDatabase) and not database.in_transaction():
        return database.atomic(lock_type="IMMEDIATE")
    return database.atomic()


def _is_postgres() -> bool:
    return isinstance(database.obj, pw.PostgresqlDatabase)


def _account(name: str, kind: str, user_id: int | None) -> LedgerAccount:
    row = LedgerAccount.get_or_none(LedgerAccount.name == name)
    if row is not None:
        return row
    try:
        with database.atomic():  # a savepoint: a concurrent creator may win
            return LedgerAccount.create(name=name, kind=kind, user_id=user_id)
    except pw.IntegrityError:
        return LedgerAccount.get(LedgerAccount.name == name)


def system_account(name: str) -> LedgerAccount:
    if name not in SYSTEM_ACCOUNTS:
        raise LedgerError(f"no system account {name!r}")
    return _account(f"system:{name}", SYSTEM, None)


def user_accounts(user_id: int) -> tuple[LedgerAccount, LedgerAccount]:
    """The user's (available, held) accounts, created on first use."""
    return (_account(f"user:{user_id}:{AVAILABLE}", AVAILABLE, user_id),
            _account(f"user:{user_id}:{HELD}", HELD, user_id))


def lock_user(user_id: int) -> tuple[LedgerAccount, LedgerAccount]:
    """Inside :func:`write_transaction`: lock the user's row, then their accounts (PostgreSQL row locks;
    SQLite's write lock is already held), and return the accounts as they are now. Everything that
    decides from a balance does it after this call, so concurrent deciders queue here."""
    available, held = user_accounts(user_id)
    if _is_postgres():
        User.select(User.id).where(User.id == user_id).for_update().execute()
        ids = sorted([available.id, held.id])
        rows = {a.id: a for a in LedgerAccount.select().where(LedgerAccount.id.in_(ids))
                .order_by(LedgerAccount.id).for_update()}
        return rows[available.id], rows[held.id]
    return available, held  # read inside this transaction, which holds SQLite's write lock: current


def exists(key: str) -> bool:
    return LedgerTransaction.select().where(LedgerTransaction.key == key).exists()


def post(key: str, kind: str, legs: Iterable[tuple[LedgerAccount, int]], *, user_id: int | None = None,
         job_id: int | None = None, description: str = "", meta: dict | None = None) -> LedgerTransaction | None:
    """Record one transaction under idempotency ``key``: ``legs`` are (account, micro-credits) pairs that
    must sum to zero. Returns the transaction, or None when ``key`` was posted before (by anyone).
    Raises LedgerError for an unbalanced or empty transaction."""
    legs = [(acct, int(amount)) for acct, amount in legs]
    if len(legs) < 2:
        raise LedgerError(f"{key}: a transaction needs at least two postings")
    if sum(amount for _, amount in legs) != 0:
        raise LedgerError(f"{key}: postings sum to {sum(a for _, a in legs)}, not zero")
    with write_transaction():
        if exists(key):
            return None
        if _is_postgres():  # the users' rows first, as lock_user and jobs.submit take them: no lock cycles
            for uid in sorted({a.user_id for a, _ in legs if a.user_id is not None}):
                User.select(User.id).where(User.id == uid).for_update().execute()
        try:
            with database.atomic():  # a savepoint: a concurrent poster of the same key may win
                txn = LedgerTransaction.create(key=key, kind=kind, user_id=user_id, job_id=job_id,
                                               description=description[:2000], meta=meta or {})
        except pw.IntegrityError:
            return None
        LedgerPosting.insert_many([{"txn": txn.id, "account": acct.id, "amount": amount}
                                   for acct, amount in legs]).execute()
        by_account: dict[int, int] = {}
        by_user: dict[int, int] = {}
        for acct, amount in legs:
            by_account[acct.id] = by_account.get(acct.id, 0) + amount
            if acct.user_id is not None:
                by_user[acct.user_id] = by_user.get(acct.user_id, 0) + amount
        for account_id in sorted(by_account):  # id order: no lock cycles between writers
            if by_account[account_id]:
                LedgerAccount.update(balance=LedgerAccount.balance + by_account[account_id]).where(
                    LedgerAccount.id == account_id).execute()
        for user_id in sorted(by_user):  # a hold moves credits within one user: no change to their total
            if by_user[user_id]:
                User.update(credit_balance=User.credit_balance + by_user[user_id]).where(User.id == user_id).execute()
    return txn


# --- reading -------------------------------------------------------------------------------------------

def balances(user_id: int) -> dict[str, int]:
    """{"balance", "held", "available"} in micro-credits (balance = available + held)."""
    rows = dict(LedgerAccount.select(LedgerAccount.kind, LedgerAccount.balance)
                .where(LedgerAccount.user_id == user_id).tuples())
    available, held = rows.get(AVAILABLE, 0), rows.get(HELD, 0)
    return {"balance": available + held, "held": held, "available": available}


def job_held(job_id: int) -> int:
    """What is still held for job ``job_id``: its holds and credit-backs minus its usage and release."""
    return int(LedgerPosting.select(pw.fn.COALESCE(pw.fn.SUM(LedgerPosting.amount), 0))
               .join(LedgerTransaction).switch(LedgerPosting).join(LedgerAccount)
               .where((LedgerTransaction.job_id == job_id) & (LedgerAccount.kind == HELD)).scalar() or 0)


def job_hold_total(job_id: int) -> int:
    """Everything ever moved into hold for the job (its hold and any extensions)."""
    return int(LedgerPosting.select(pw.fn.COALESCE(pw.fn.SUM(LedgerPosting.amount), 0))
               .join(LedgerTransaction).switch(LedgerPosting).join(LedgerAccount)
               .where((LedgerTransaction.job_id == job_id) & (LedgerAccount.kind == HELD)
                      & LedgerTransaction.kind.in_([HOLD, HOLD_EXTEND])).scalar() or 0)


def job_charged(job_id: int) -> int:
    """Net micro-credits job ``job_id`` paid: what reached revenue from its usage, less credit-backs and
    admin refunds."""
    return int(LedgerPosting.select(pw.fn.COALESCE(pw.fn.SUM(LedgerPosting.amount), 0))
               .join(LedgerTransaction).switch(LedgerPosting).join(LedgerAccount)
               .where((LedgerTransaction.job_id == job_id) & (LedgerAccount.name == f"system:{REVENUE}")).scalar()
               or 0)


def job_lines(job_id: int) -> list[LedgerTransaction]:
    return list(LedgerTransaction.select().where(LedgerTransaction.job_id == job_id)
                .order_by(LedgerTransaction.id))


def user_lines(user_id: int, *, limit: int = 50, before: int | None = None) -> list[dict[str, Any]]:
    """The user's ledger lines, newest first: each with what it did to their available and held credits."""
    query = LedgerTransaction.select().where(LedgerTransaction.user_id == user_id)
    if before is not None:
        query = query.where(LedgerTransaction.id < before)
    txns = list(query.order_by(LedgerTransaction.id.desc()).limit(limit))
    deltas: dict[int, dict[str, int]] = {t.id: {AVAILABLE: 0, HELD: 0} for t in txns}
    if txns:
        rows = (LedgerPosting.select(LedgerPosting.txn, LedgerAccount.kind, LedgerPosting.amount)
                .join(LedgerAccount)
                .where(LedgerPosting.txn.in_(list(deltas)) & (LedgerAccount.user_id == user_id)).tuples())
        for txn_id, kind, amount in rows:
            deltas[txn_id][kind] += amount
    return [{"id": t.id, "kind": t.kind, "description": t.description, "job_id": t.job_id,
             "created_at": t.created_at, "available": deltas[t.id][AVAILABLE], "held": deltas[t.id][HELD],
             "meta": t.meta} for t in txns]


# --- the audit -----------------------------------------------------------------------------------------

def audit(*, settle_grace: dt.timedelta = dt.timedelta(minutes=5)) -> list[str]:
    """Recompute the ledger and list every broken invariant (empty: all is well). ``settle_grace``: how
    long a finished job may wait for its settlement (the reconciler settles within seconds)."""
    from ..db import LEDGER_TRIGGERS, ledger_triggers_present

    problems: list[str] = []
    missing = sorted(set(LEDGER_TRIGGERS) - ledger_triggers_present())
    if missing:
        problems.append(f"append-only triggers missing: {', '.join(missing)}")
    total = pw.fn.COALESCE(pw.fn.SUM(LedgerPosting.amount), 0)
    for txn_id, key, s, n in (LedgerTransaction.select(LedgerTransaction.id, LedgerTransaction.key, total,
                                                       pw.fn.COUNT(LedgerPosting.id))
                              .join(LedgerPosting, pw.JOIN.LEFT_OUTER).group_by(LedgerTransaction.id)
                              .having((total != 0) | (pw.fn.COUNT(LedgerPosting.id) < 2)).tuples()):
        problems.append(f"transaction {txn_id} ({key}): {n} postings summing to {s}")
    for acct_id, name, cached, s in (LedgerAccount.select(LedgerAccount.id, LedgerAccount.name,
                                                          LedgerAccount.balance, total)
                                     .join(LedgerPosting, pw.JOIN.LEFT_OUTER).group_by(LedgerAccount.id)
                                     .having(LedgerAccount.balance != total).tuples()):
        problems.append(f"account {name}: cached balance {cached} but its postings sum to {s}")
    for name, bal in (LedgerAccount.select(LedgerAccount.name, LedgerAccount.balance)
                      .where((LedgerAccount.kind == HELD) & (LedgerAccount.balance < 0)).tuples()):
        problems.append(f"account {name}: negative hold {bal}")
    owned = {uid: 0 for (uid,) in User.select(User.id).tuples()}
    for uid, bal in (LedgerAccount.select(LedgerAccount.user_id, pw.fn.SUM(LedgerAccount.balance))
                     .where(LedgerAccount.user_id.is_null(False)).group_by(LedgerAccount.user_id).tuples()):
        if uid in owned:
            owned[uid] = int(bal)
    for uid, cached in User.select(User.id, User.credit_balance).tuples():
        if cached != owned.get(uid, 0):
            problems.append(f"user {uid}: credit_balance {cached} but their accounts hold {owned.get(uid, 0)}")
    problems += _audit_jobs(settle_grace)
    return problems


def _audit_jobs(settle_grace: dt.timedelta) -> list[str]:
    from .. import jobs  # the job states (jobs.py imports nothing of billing)

    problems: list[str] = []
    counts: dict[tuple[int, str], int] = {}
    for job_id, kind, n in (LedgerTransaction.select(LedgerTransaction.job_id, LedgerTransaction.kind,
                                                     pw.fn.COUNT(LedgerTransaction.id))
                            .where(LedgerTransaction.job_id.is_null(False)
                                   & LedgerTransaction.kind.in_([HOLD, SETTLE]))
                            .group_by(LedgerTransaction.job_id, LedgerTransaction.kind).tuples()):
        counts[(job_id, kind)] = n
    held = dict(LedgerPosting.select(LedgerTransaction.job_id, pw.fn.SUM(LedgerPosting.amount))
                .join(LedgerTransaction).switch(LedgerPosting).join(LedgerAccount)
                .where(LedgerTransaction.job_id.is_null(False) & (LedgerAccount.kind == HELD))
                .group_by(LedgerTransaction.job_id).tuples())
    status = dict(TrainingJob.select(TrainingJob.id, TrainingJob.status).tuples())
    finished = dict(TrainingJob.select(TrainingJob.id, TrainingJob.finished_at).tuples())
    late = utcnow() - settle_grace
    for jb in JobBilling.select():
        j = jb.job_id
        holds, settles = counts.get((j, HOLD), 0), counts.get((j, SETTLE), 0)
        if holds != 1:
            problems.append(f"job {j}: {holds} holds (expected exactly one)")
        if settles > 1:
            problems.append(f"job {j}: {settles} settlements")
        if int(held.get(j, 0)) < 0:
            problems.append(f"job {j}: holds {held[j]} (negative)")
        final = status.get(j) is None or status[j] in jobs.FINAL
        if settles and not final:
            problems.append(f"job {j}: settled but still {status.get(j)}")
        if settles and int(held.get(j, 0)) != 0:
            problems.append(f"job {j}: settled with {held[j]} still held")
        if final and not settles and (finished.get(j) or jb.created_at) < late:
            problems.append(f"job {j}: {status.get(j) or 'deleted'} since {finished.get(j)} but not settled")
        if bool(jb.settled_at) != bool(settles):
            problems.append(f"job {j}: settled_at {jb.settled_at} disagrees with {settles} settlement lines")
    return problems
