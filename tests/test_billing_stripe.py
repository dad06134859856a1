"""Buying credits through the real ``stripe`` package against a fake Stripe on loopback: sessions made
from the catalogue, the webhook's signature check, idempotent and order-independent fulfilment under
concurrent deliveries, refunds and disputes, the return page, and the webhook as the one route that
takes no CSRF token."""

from __future__ import annotations

import itertools
import json
import re
import time

import requests
from billing_helpers import hosted, ledger_checked, stripe_fake  # noqa: F401 - fixtures
from billing_helpers import PACKS, available, in_threads, post_json, verified
from chat_fixtures import LiveServer
from conftest import PASSWORD, client_as
from fake_stripe import WEBHOOK_SECRET

from nanochat_studio.billing import ledger
from nanochat_studio.db import database
from nanochat_studio.models import LedgerTransaction, StripeEvent


def checkout(client, pack="small", **kw):
    return post_json(client, "/api/credits/checkout", {"pack": pack}, **kw)


def deliver(client, fake, event, *, secret=None, timestamp=None):
    payload = json.dumps(event).encode()
    return client.post("/stripe/webhook", data=payload, content_type="application/json",
                       headers={"Stripe-Signature": fake.sign(payload, secret=secret, timestamp=timestamp)})


def purchases() -> list[LedgerTransaction]:
    return list(LedgerTransaction.select().where(LedgerTransaction.kind == ledger.PURCHASE))


def test_a_checkout_session_comes_from_the_catalogue_never_from_the_client(hosted, stripe_fake):
    app = hosted()
    alice = verified("alice")
    c = client_as(app, alice)
    r = post_json(c, "/api/credits/checkout", {"pack": "small", "amount": 1, "credits": 1_000_000})
    assert r.status_code == 200, r.get_json()
    session = stripe_fake.sessions[r.json["session_id"]]
    assert r.json["url"] == session["url"] and r.json["url"].startswith(stripe_fake.url + "/pay/")
    assert session["amount_total"] == 500 and session["currency"] == "usd"  # the pack's, not the body's
    assert session["client_reference_id"] == str(alice.id)
    assert session["metadata"] == {"user_id": str(alice.id), "pack": "small", "credits": "10000000"}
    assert session["customer_email"] == "alice@example.com"
    assert session["success_url"].endswith("/account/credits/return?session_id={CHECKOUT_SESSION_ID}")

    # One click, one session: a retried request with the same key gets the same session.
    a = checkout(c, headers={"Idempotency-Key": "click-1"})
    b = checkout(c, headers={"Idempotency-Key": "click-1"})
    assert a.json == b.json and a.json["session_id"] != r.json["session_id"]
    assert checkout(c, headers={"Idempotency-Key": "click-2"}).json["session_id"] != a.json["session_id"]

    bad = checkout(c, pack="huge")
    assert bad.status_code == 400 and bad.json["error"]["code"] == "unknown_pack" and "small, large" in \
        bad.json["error"]["message"]
    assert post_json(c, "/api/credits/checkout", {"credits": 5}).status_code == 400
    assert ledger.balances(alice.id)["available"] == 0  # nothing is credited before a payment


def test_an_unverified_account_cannot_buy_and_buying_can_be_off(hosted, make_app):
    app = hosted()
    database.connect(reuse_if_open=True)
    from conftest import make_user

    bob = make_user("bob")
    r = checkout(client_as(app, bob))
    assert r.status_code == 403 and r.json["error"]["code"] == "email_unverified"
    off = make_app(mode="hosted", credit_packs=PACKS)  # no Stripe key: nothing for sale
    database.connect(reuse_if_open=True)
    carol = verified("carol")
    assert checkout(client_as(off, carol)).status_code == 404
    assert client_as(off, carol).get("/api/account").json["can_buy"] is False
    solo = make_app(mode="solo")
    database.connect(reuse_if_open=True)
    assert client_as(solo, carol).get("/api/account").json["mode"] == "off"


def test_100_concurrent_deliveries_of_one_event_and_a_second_event_give_one_top_up(hosted, stripe_fake):
    app = hosted(threads=40)
    alice = verified("alice")
    server = LiveServer(app, threads=32)
    try:
        sid = checkout(client_as(app, alice)).json["session_id"]
        completed = stripe_fake.complete(sid)
        succeeded = stripe_fake.async_succeeded(sid)  # another event id, the same session
        url = f"{server.url}/stripe/webhook"

        def send(i: int) -> int:
            return stripe_fake.deliver(succeeded if i == 99 else completed, url).status_code

        codes = in_threads(100, send)
    finally:
        server.close()
    database.connect(reuse_if_open=True)
    assert codes == [200] * 100
    assert len(purchases()) == 1 and available(alice) == 10_000_000
    assert StripeEvent.select().count() == 2


def _order_set(fake, client) -> list[dict]:
    """A paid session's four events: completed, async succeeded, a partial refund, a dispute."""
    sid = checkout(client, pack="large").json["session_id"]  # 100 credits for 4000
    return [fake.complete(sid), fake.async_succeeded(sid), fake.refund(sid, 1000), fake.dispute(sid, 400)]


def test_every_order_of_four_events_ends_in_the_same_ledger(hosted, stripe_fake):
    app = hosted()
    alice = verified("alice")
    c = client_as(app, alice)
    hook = app.test_client()
    orders = list(itertools.permutations(range(4)))
    assert len(orders) == 24
    for order in orders:
        before = available(alice)
        events = _order_set(stripe_fake, c)
        for i in order:
            r = deliver(hook, stripe_fake, events[i])
            assert r.status_code == 200, (order, r.get_json())
        for i in order:  # and a redelivery of everything changes nothing
            deliver(hook, stripe_fake, events[i])
        # +100 credits, -25 refunded (1000 of 4000), -10 disputed (400 of 4000)
        assert available(alice) - before == 65_000_000, order
    assert len(purchases()) == 24
    kinds = [t.kind for t in LedgerTransaction.select().where(LedgerTransaction.user_id == alice.id)]
    assert kinds.count(ledger.REFUND) == 24 and kinds.count(ledger.DISPUTE) == 24


def test_a_won_dispute_gives_the_credits_back_in_either_order(hosted, stripe_fake):
    app = hosted()
    alice = verified("alice")
    c, hook = client_as(app, alice), app.test_client()
    for first_closed in (False, True):
        before = available(alice)
        sid = checkout(c).json["session_id"]
        done = stripe_fake.complete(sid)
        opened = stripe_fake.dispute(sid, 500, dispute_id=f"dp_{first_closed}")
        won = stripe_fake.dispute(sid, 500, "charge.dispute.closed", status="won", dispute_id=f"dp_{first_closed}")
        for ev in ([won, opened, done] if first_closed else [done, opened, won]):
            assert deliver(hook, stripe_fake, ev).status_code == 200
        assert available(alice) - before == 10_000_000


def test_a_refund_of_spent_credits_takes_the_balance_negative(hosted, stripe_fake):
    app = hosted()
    alice = verified("alice")
    c, hook = client_as(app, alice), app.test_client()
    sid = checkout(c).json["session_id"]
    assert deliver(hook, stripe_fake, stripe_fake.complete(sid)).status_code == 200
    from nanochat_studio import billing

    billing.revoke(alice, 8, "spent on training")  # stands in for credits used up
    assert deliver(hook, stripe_fake, stripe_fake.refund(sid, 500)).json["outcome"] == "1 refund(s) applied"
    assert available(alice) == -8_000_000
    r = client_as(app, alice).get("/api/account").json
    assert r["available"] == -8.0 and r["balance"] == -8.0 and r["held"] == 0


def test_forged_and_stale_signatures_are_refused_and_a_rotated_secret_still_works(hosted, stripe_fake):
    app = hosted(stripe_webhook_secret=f"whsec_new_secret, {WEBHOOK_SECRET}")
    alice = verified("alice")
    hook = app.test_client()
    event = stripe_fake.complete(checkout(client_as(app, alice)).json["session_id"])
    payload = json.dumps(event).encode()

    def post(body: bytes, header: str | None):
        headers = {"Stripe-Signature": header} if header is not None else {}
        return hook.post("/stripe/webhook", data=body, content_type="application/json", headers=headers)

    forged = post(payload, stripe_fake.sign(payload, secret="whsec_attacker"))
    tampered = post(payload.replace(b'"paid"', b'"paid" '), stripe_fake.sign(payload))
    stale = post(payload, stripe_fake.sign(payload, timestamp=int(time.time()) - 301))
    unsigned = post(payload, None)
    garbage = post(payload, "t=abc,v1=zz")
    for r in (forged, tampered, stale, unsigned, garbage):
        assert r.status_code == 400 and r.json["error"]["code"] == "bad_signature"
    assert available(alice) == 0 and StripeEvent.select().count() == 0

    # Any matching v1 counts (Stripe sends one per active secret while rolling a secret).
    good = stripe_fake.sign(payload, secret="whsec_new_secret").split(",")[1]
    both = stripe_fake.sign(payload, secret="whsec_other") + "," + good
    assert post(payload, both).status_code == 200
    assert post(payload, stripe_fake.sign(payload, timestamp=int(time.time()) - 290)).json["outcome"] == "duplicate"
    assert available(alice) == 10_000_000


def test_the_return_page_fulfils_through_the_same_function_once(hosted, stripe_fake):
    app = hosted()
    alice, bob = verified("alice"), verified("bob")
    c = client_as(app, alice)
    sid = checkout(c).json["session_id"]
    r = c.get(f"/account/credits/return?session_id={sid}")  # came back before paying (or async pending)
    assert r.status_code == 302 and available(alice) == 0
    stripe_fake.complete(sid)
    assert client_as(app, bob).get(f"/account/credits/return?session_id={sid}").status_code == 302
    assert available(bob) == 0  # not bob's session
    c.get(f"/account/credits/return?session_id={sid}")
    c.get(f"/account/credits/return?session_id={sid}")
    assert available(alice) == 10_000_000
    assert deliver(app.test_client(), stripe_fake, stripe_fake.event("checkout.session.completed",
                                                                     stripe_fake.sessions[sid])).status_code == 200
    assert len(purchases()) == 1 and available(alice) == 10_000_000
    page = c.get("/account").get_data(as_text=True)
    assert "Bought 10 credits (small, 5.00 USD)" in page and 'id="available">10.00' in page


def test_the_account_api_and_its_transactions(hosted, stripe_fake):
    app = hosted()
    alice = verified("alice")
    from nanochat_studio import billing

    for i in range(5):
        billing.grant(alice, 1, f"gift {i}")
    c = client_as(app, alice)
    acct = c.get("/api/account").json
    assert (acct["balance"], acct["held"], acct["available"]) == (5.0, 0.0, 5.0)
    assert acct["can_buy"] is True and [p["id"] for p in acct["packs"]] == ["small", "large"]
    page = c.get("/api/account/transactions?limit=3").json
    assert [t["description"] for t in page["transactions"]] == ["Granted: gift 4", "Granted: gift 3", "Granted: gift 2"]
    assert page["transactions"][0]["available"] == 1.0 and page["next"]
    rest = c.get(page["next"]).json
    assert [t["description"] for t in rest["transactions"]] == ["Granted: gift 1", "Granted: gift 0"]
    assert rest["next"] is None
    assert c.get("/api/account/transactions?limit=x").status_code == 400
    assert client_as(app, verified("bob")).get("/api/account/transactions").json["transactions"] == []


def test_the_webhook_is_the_only_route_that_takes_no_csrf_token(hosted, stripe_fake):
    app = hosted()
    alice = verified("alice", admin=True)
    c = client_as(app, alice)
    checked = 0
    for rule in app.url_map.iter_rules():
        if "POST" not in rule.methods:
            continue
        url = rule.rule
        for arg in rule.arguments:
            url = url.replace(f"<int:{arg}>", "1").replace(f"<{arg}>", "x")
        r = c.post(url, data={"x": "1"})  # a form, as another site could send it, without the token
        code = (r.get_json(silent=True) or {}).get("error", {}).get("code")
        if rule.endpoint == "billing.stripe_webhook":
            assert r.status_code == 400 and code == "bad_signature", url
        else:
            assert r.status_code in (400, 403), (url, r.status_code)
            assert code == "csrf_failed" or "expired or was not sent from this site" in r.get_data(as_text=True), url
        checked += 1
    assert checked > 20


def test_buying_from_the_account_page_through_the_fake_checkout_page(hosted, stripe_fake):
    """The form path without a browser: button -> Stripe's page -> Pay -> webhook and return page."""
    app = hosted()
    alice = verified("alice")
    server = LiveServer(app)
    stripe_fake.webhook_url = f"{server.url}/stripe/webhook"
    try:
        s = _login(server.url)
        page = s.get(f"{server.url}/account").text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        click = re.search(r'name="click" value="([^"]+)"', page).group(1)
        r = s.post(f"{server.url}/account/credits/checkout", data={"csrf_token": token, "pack": "small",
                                                                   "click": click}, allow_redirects=False)
        assert r.status_code == 303 and r.headers["Location"].startswith(stripe_fake.url + "/pay/")
        again = s.post(f"{server.url}/account/credits/checkout", data={"csrf_token": token, "pack": "small",
                                                                       "click": click}, allow_redirects=False)
        assert again.headers["Location"] == r.headers["Location"]  # a double submit: the same session
        paid = s.post(r.headers["Location"], data={"action": "pay"})  # follows back to /account
        assert paid.url == f"{server.url}/account" and "10 credits are in your account" in paid.text
    finally:
        server.close()
    database.connect(reuse_if_open=True)
    assert stripe_fake.deliveries == [200] and len(purchases()) == 1 and available(alice) == 10_000_000


def _login(base: str) -> requests.Session:
    s = requests.Session()
    page = s.get(f"{base}/account/login").text
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)
    r = s.post(f"{base}/account/login", data={"csrf_token": token, "email": "alice@example.com",
                                              "password": PASSWORD}, allow_redirects=False)
    assert r.status_code in (302, 303), r.text[:300]
    return s

