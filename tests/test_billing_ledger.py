"""The ledger itself, on SQLite and PostgreSQL: balanced postings, idempotency keys, append-only rows
refused below the ORM, the audit catching tampering, grants from the command line, sign-up credits."""

from __future__ import annotations

import peewee as pw
import pytest
from billing_helpers import hosted, ledger_checked, stripe_fake  # noqa: F401 - fixtures
from billing_helpers import available, verified
from click.testing import CliRunner

from nanochat_studio import billing, db
from nanochat_studio.billing import ledger
from nanochat_studio.cli import main
from nanochat_studio.db import database
from nanochat_studio.errors import BadRequest
from nanochat_studio.models import LedgerAccount, LedgerPosting, LedgerTransaction, User


@pytest.fixture
def store(app):
    database.connect(reuse_if_open=True)
    return database


def test_units_are_exact_micro_credits():
    assert ledger.to_micro("0.1") == 100_000 and ledger.to_micro(0.3) == 300_000
    assert ledger.to_micro("12.3456785") == 12_345_678  # half to even at the micro
    assert ledger.credits_text(12_500_000) == "12.5" and ledger.credits_text(-123) == "-0.000123"
    assert ledger.cost_micro(1.5, 10_000) == 15_000 and ledger.cost_micro(0.00001, 1) == 1  # rounded up
    for bad in ("ten", float("nan"), "inf", True):
        with pytest.raises(ValueError):
            ledger.to_micro(bad)


def test_a_transaction_must_balance_and_its_key_works_once(store):
    alice = verified("alice")
    avail, held = ledger.user_accounts(alice.id)
    grants = ledger.system_account(ledger.GRANTS)
    with pytest.raises(ledger.LedgerError, match="sum to 5"):
        ledger.post("bad", ledger.GRANT, [(grants, -5), (avail, 10)], user_id=alice.id)
    with pytest.raises(ledger.LedgerError, match="two postings"):
        ledger.post("lonely", ledger.GRANT, [(avail, 0)])
    assert not ledger.exists("bad") and LedgerPosting.select().count() == 0

    first = ledger.post("gift:1", ledger.GRANT, [(grants, -7), (avail, 7)], user_id=alice.id)
    again = ledger.post("gift:1", ledger.GRANT, [(grants, -7), (avail, 7)], user_id=alice.id)
    assert first is not None and again is None
    assert ledger.balances(alice.id) == {"balance": 7, "held": 0, "available": 7}
    assert User.get_by_id(alice.id).credit_balance == 7
    assert LedgerAccount.get_by_id(grants.id).balance == -7


def _raw(sql: str) -> None:
    with database.atomic():
        database.execute_sql(sql)


def test_ledger_rows_cannot_be_updated_or_deleted_even_in_raw_sql(store):
    alice = verified("alice", credits=5)
    txn = LedgerTransaction.get()
    for sql in ("UPDATE ledger_transaction SET description = 'rewritten'",
                "DELETE FROM ledger_transaction",
                "UPDATE ledger_posting SET amount = amount * 2",
                "DELETE FROM ledger_posting",
                "DELETE FROM ledger_account",
                "UPDATE ledger_account SET name = 'user:999:available'",
                "UPDATE ledger_account SET user_id = 999"):
        with pytest.raises(pw.DatabaseError, match="append-only|never deleted|keeps its name"):
            _raw(sql)
    if db.is_postgres():
        with pytest.raises(pw.DatabaseError, match="append-only"):
            _raw("TRUNCATE ledger_posting")
    # ...nor through the ORM
    txn.description = "rewritten"
    with pytest.raises(pw.DatabaseError):
        with database.atomic():
            txn.save()
    with pytest.raises(pw.DatabaseError):
        with database.atomic():
            LedgerPosting.get().delete_instance()
    assert LedgerTransaction.get().description.startswith("Granted") and available(alice) == 5_000_000


def test_the_audit_finds_a_tampered_balance_a_missing_trigger_and_the_cli_fails(store, home, db_url):
    alice = verified("alice", credits=3)
    assert ledger.audit() == []
    run = CliRunner().invoke(main, ["billing", "audit"], env={"NCS_HOME": str(home), "NCS_DATABASE_URL": db_url})
    assert run.exit_code == 0, run.output

    avail, _ = ledger.user_accounts(alice.id)
    _raw(f"UPDATE ledger_account SET balance = balance + 1 WHERE id = {avail.id}")  # a cache edited by hand
    problems = ledger.audit()
    assert any(f"account user:{alice.id}:available: cached balance 3000001" in p for p in problems)
    assert any(f"user {alice.id}: credit_balance 3000000 but their accounts hold 3000001" in p for p in problems)
    run = CliRunner().invoke(main, ["billing", "audit"], env={"NCS_HOME": str(home), "NCS_DATABASE_URL": db_url})
    assert run.exit_code == 1 and "cached balance" in run.output
    _raw(f"UPDATE ledger_account SET balance = balance - 1 WHERE id = {avail.id}")

    _raw("DROP TRIGGER ledger_posting_no_delete" + (" ON ledger_posting" if db.is_postgres() else ""))
    assert ledger.audit() == ["append-only triggers missing: ledger_posting_no_delete"]
    from nanochat_studio.db import _ledger_triggers_postgres, _ledger_triggers_sqlite

    for sql in _ledger_triggers_postgres() if db.is_postgres() else _ledger_triggers_sqlite():
        _raw(sql)
    assert ledger.audit() == []


def test_admins_grant_and_revoke_from_the_command_line_with_a_reason(store, home, db_url):
    alice = verified("alice")
    env = {"NCS_HOME": str(home), "NCS_DATABASE_URL": db_url}
    runner = CliRunner()
    r = runner.invoke(main, ["credits", "grant", "alice@example.com", "12.5", "--reason", "workshop"], env=env)
    assert r.exit_code == 0, r.output
    assert "available now 12.5" in r.output
    r = runner.invoke(main, ["credits", "grant", "alice@example.com", "5"], env=env)
    assert r.exit_code == 2 and "--reason" in r.output  # a grant without a reason is refused
    r = runner.invoke(main, ["credits", "revoke", "alice@example.com", "20", "--reason", "typo"], env=env)
    assert r.exit_code == 1 and "has only 12.5 credits available" in r.output
    r = runner.invoke(main, ["credits", "revoke", "alice@example.com", "2.5", "--reason", "typo"], env=env)
    assert r.exit_code == 0 and "available now 10" in r.output
    r = runner.invoke(main, ["credits", "grant", "nobody@example.com", "1", "--reason", "x"], env=env)
    assert r.exit_code == 1 and "no user with email" in r.output
    r = runner.invoke(main, ["credits", "show", "alice@example.com"], env=env)
    assert "available 10, held 0, balance 10" in r.output and "Granted: workshop" in r.output
    assert "Revoked: typo" in r.output
    database.connect(reuse_if_open=True)
    assert available(alice) == 10_000_000
    with pytest.raises(BadRequest, match="above 0"):
        billing.grant(alice, "-1", "negative")


def test_signup_credits_are_granted_once_on_a_verified_hosted_account(make_app):
    app = make_app(mode="hosted", signup_credits=2.5)
    database.connect(reuse_if_open=True)
    alice = verified("alice")
    settings = app.config["NCS_SETTINGS"]
    assert billing.on_email_verified(alice, settings) == 2_500_000
    assert billing.on_email_verified(alice, settings) == 0  # verified again: nothing more
    with app.app_context():
        assert billing.on_email_verified(alice) == 0  # the settings of the app at hand
    assert available(alice) == 2_500_000
    lab = make_app(mode="lab", signup_credits=2.5).config["NCS_SETTINGS"]
    database.connect(reuse_if_open=True)
    bob = verified("bob")
    assert billing.on_email_verified(bob, lab) == 0 and available(bob) == 0


def test_the_billing_migration_builds_its_tables_and_triggers_once(db_url):
    database_ = db.open_database(db_url)
    assert db.migrate(database_) == [v for v, _, _ in db.MIGRATIONS]
    assert db.ledger_triggers_present() == set(db.LEDGER_TRIGGERS)
    assert "email_verified_at" in {c.name for c in database_.get_columns("user")}
    assert db.migrate(database_) == []
    database_.close()


def test_settings_reject_malformed_prices_and_packs(tmp_path):
    from nanochat_studio.settings import SettingsError, load_settings

    def load(**env):
        return load_settings(environ={"NCS_HOME": str(tmp_path), **env})

    s = load(NCS_PRICES='{"cpu": 0.5, "H100": 0.02}', NCS_CREDIT_PACKS='[{"id": "a", "credits": 5, "amount": 300, '
             '"currency": "EUR", "price": "price_123"}]', NCS_SIGNUP_CREDITS="3",
             NCS_STRIPE_WEBHOOK_SECRET="whsec_a, whsec_b", NCS_STRIPE_API_BASE="http://127.0.0.1:9/")
    assert s.prices == {"cpu": 0.5, "H100": 0.02} and s.credit_packs[0]["currency"] == "eur"
    assert s.signup_credits == 3.0 and s.stripe_api_base == "http://127.0.0.1:9"
    for env, message in [
        ({"NCS_PRICES": '{"cpu": -1}'}, "NCS_PRICES"),
        ({"NCS_PRICES": '{"cpu": "free"}'}, "NCS_PRICES"),
        ({"NCS_CREDIT_PACKS": '{"id": "a"}'}, "NCS_CREDIT_PACKS: expected a JSON list"),
        ({"NCS_CREDIT_PACKS": '[{"id": "a", "credits": 5, "amount": 2.5, "currency": "usd"}]'}, "minor units"),
        ({"NCS_CREDIT_PACKS": '[{"id": "a", "credits": 0, "amount": 5, "currency": "usd"}]'}, "'credits'"),
        ({"NCS_CREDIT_PACKS": '[{"id": "a", "credits": 1, "amount": 5, "currency": "dollars"}]'}, "three-letter"),
        ({"NCS_CREDIT_PACKS": '[{"id": "a", "credits": 1, "amount": 5, "currency": "usd"}, '
                              '{"id": "a", "credits": 2, "amount": 9, "currency": "usd"}]'}, "used twice"),
        ({"NCS_CREDIT_PACKS": '[{"id": "a", "credits": 1, "amount": 5, "currency": "usd", "cost": 1}]'}, "unknown key"),
        ({"NCS_SIGNUP_CREDITS": "-2"}, "NCS_SIGNUP_CREDITS"),
        ({"NCS_STRIPE_API_BASE": "stripe.example"}, "NCS_STRIPE_API_BASE"),
    ]:
        with pytest.raises(SettingsError, match=message):
            load(**env)
    secret = tmp_path / "sk"
    secret.write_text("sk_live_from_a_file\n")
    assert load(NCS_STRIPE_SECRET_KEY_FILE=str(secret)).stripe_secret_key == "sk_live_from_a_file"
    assert load(NCS_STRIPE_SECRET_KEY="sk_x").public()["stripe_secret_key"] == "***"
