"""The billing policies: what a mode charges and how. :class:`Billing` is the null policy (solo mode, and
lab users without an allowance): free and unlimited. :class:`HostedBilling` prices device-seconds
(``prices``), sells credit packs through Stripe and wants a verified email; :class:`LabBilling` counts
device-hours against an admin's monthly allowance. A charging policy quotes a plan, places a job's hold
in the transaction that creates the job (an atomic check-and-hold: 402 with the numbers when the
credits do not cover it), and extends the hold when a job paused out of credits is resumed.

Errors: ``InsufficientCredits`` (402), ``Forbidden`` (403, hosted: email not verified), ``BadRequest``
(a device without a price, a run that cannot be timed), ``Conflict`` (resuming a job that is not paused).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .. import accounts, datasets, estimate, jobs
from ..errors import BadRequest, Conflict, Forbidden, PaymentRequired
from ..models import DeviceAllowance, JobBilling, TrainingJob, User
from ..settings import Settings
from . import ledger, metering
from .events import notify
from .ledger import MICRO, credits_text, to_credits

HOLD_MARGIN = 0.25  # a hold is the estimate plus this share: estimates of new shapes are rough
MIN_HOLD_DEVICE_S = 30.0  # no hold is smaller than this much device time (start-up, first checkpoint)
LAB_RATE = MICRO / 3600  # lab mode: one credit is one device-hour
ZERO_DECIMAL_CURRENCIES = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx",
                                     "vnd", "vuv", "xaf", "xof", "xpf"})


class InsufficientCredits(PaymentRequired):
    """402 with the numbers: what it costs, what is available, where to top up."""

    code = "insufficient_credits"


# --- the policies ----------------------------------------------------------------------------------------

class Billing:
    """The null policy (solo mode, and lab mode for users without an allowance): free, unlimited."""

    mode = "off"
    unit = "credits"

    def __init__(self, settings: Settings):
        self.settings = settings

    def applies_to(self, user: User) -> bool:
        return False

    @property
    def packs(self) -> list[dict]:
        return []

    def can_buy(self) -> bool:
        return False

    def quote(self, plan: dict[str, Any], user: User, gpus: int = 1) -> dict[str, Any] | None:
        """The cost of ``plan`` (an estimate) for ``user``: None when nothing is charged."""
        return None

    def submit_hook(self, user: User, calibrator: estimate.Calibrator) -> Callable[[TrainingJob], None] | None:
        """What ``jobs.submit`` runs inside the transaction creating a job (the hold); None: nothing."""
        return None

    def before_hold(self, user: User) -> None:
        """Runs inside the hold's transaction before the balance is read (lab: this month's allowance)."""

    def resume(self, job: TrainingJob, user: User) -> None:
        """Queue paused ``job`` again; a billed job's hold first grows to what the rest of the run should
        cost (402 when the credits do not cover it; whatever mode billed it). Conflict unless paused."""
        jb = JobBilling.get_or_none(JobBilling.job_id == job.id)
        with ledger.write_transaction():
            if jb is not None:
                self._extend_hold(job, user, jb)
            if not jobs.resume(job.id):
                raise Conflict(f"job {job.id} is {jobs.get(job.id).status}, not paused")

    def _extend_hold(self, job: TrainingJob, user: User, jb: JobBilling) -> None:
        metering.settle_job(job.id, notify)  # meter the attempts that ended, so what the job still holds is known
        need = cost_to_finish(job, jb)
        self.before_hold(user)
        available, held = ledger.lock_user(user.id)
        extend = max(0, need - ledger.job_held(job.id))
        if extend > available.balance:
            self.refuse(user, extend, available.balance, need, "to resume this job")
        if extend:
            n = len([t for t in ledger.job_lines(job.id) if t.kind == ledger.HOLD_EXTEND]) + 1
            ledger.post(f"extend:{job.id}:{n}", ledger.HOLD_EXTEND, [(available, -extend), (held, extend)],
                        user_id=user.id, job_id=job.id,
                        description=f"Job #{job.id}: hold extended by {credits_text(extend)} to finish the run",
                        meta={"need": need})

    def refuse(self, user: User, needed: int, available: int, cost: int, what: str) -> None:
        """Raise the 402 with the numbers (and tell the observers)."""
        notify("refused", user_id=user.id, reason="insufficient", needed=needed, available=available)
        raise InsufficientCredits(
            f"Not enough {self.unit} {what}: it needs {credits_text(needed)} held (an estimated "
            f"{credits_text(cost)} plus a margin) and you have {credits_text(available)} available. "
            + self.top_up_hint(),
            details={"cost": to_credits(cost), "hold": to_credits(needed), "available": to_credits(available),
                     "unit": self.unit, "top_up": "/account"})

    def account(self, user: User) -> dict[str, Any] | None:
        return None

    def top_up_hint(self) -> str:
        return "Buy credits on your account page (/account)."


class _Charging(Billing):
    """What hosted and lab modes share: a rate per device-second, holds, resumes."""

    def rate_for(self, device: dict[str, Any]) -> tuple[str, float]:
        raise NotImplementedError

    def applies_to(self, user: User) -> bool:
        return True

    def terms(self, plan: dict[str, Any], gpus: int) -> dict[str, Any]:
        seconds = plan.get("time", {}).get("seconds")
        if seconds is None:
            raise BadRequest("this run cannot be timed on this device, so it cannot be priced", code="no_estimate")
        device, rate = self.rate_for(plan.get("device") or {})
        device_s = float(seconds) * gpus
        return {"device": device, "rate": rate, "gpus": gpus, "estimate_s": float(seconds),
                "device_seconds": device_s, "cost": ledger.cost_micro(device_s, rate),
                "hold": ledger.cost_micro(max(device_s * (1 + HOLD_MARGIN), MIN_HOLD_DEVICE_S * gpus), rate)}

    def quote(self, plan: dict[str, Any], user: User, gpus: int = 1) -> dict[str, Any] | None:
        if not self.applies_to(user):
            return None
        try:
            t = self.terms(plan, gpus)
        except BadRequest as exc:
            return {"credits": None, "error": exc.message}
        self.before_hold_outside(user)
        available = ledger.balances(user.id)["available"]
        return {"credits": to_credits(t["cost"]), "hold": to_credits(t["hold"]), "unit": self.unit,
                "device_seconds": round(t["device_seconds"], 1), "device": t["device"],
                "credits_per_device_second": t["rate"] / MICRO, "available": to_credits(available),
                "enough": available >= t["hold"], "money": self.money(t["cost"]), "top_up": "/account"}

    def before_hold_outside(self, user: User) -> None:
        """What before_hold does, for a read (a quote, the account page), in its own transaction."""

    def money(self, micro: int) -> dict[str, Any] | None:
        return None

    def require_may_train(self, user: User) -> None:
        pass

    def submit_hook(self, user: User, calibrator: estimate.Calibrator) -> Callable[[TrainingJob], None] | None:
        if not self.applies_to(user):
            return None
        self.require_may_train(user)
        calibrator.device()  # probed now, not under the write lock the hook runs in

        def hold(job: TrainingJob) -> None:
            spec = datasets.describe_spec(job.config.get("dataset"))
            plan = estimate.estimate_for({**job.config, "dataset": spec}, user, calibrator, calibrate=False)
            self.place_hold(job, user, self.terms(plan, int(job.config.get("gpus") or 1)))

        return hold

    def place_hold(self, job: TrainingJob, user: User, t: dict[str, Any]) -> None:
        """The atomic check-and-hold: under the user's lock, refuse (402) or move the hold from available
        to held and record the job's terms."""
        with ledger.write_transaction():
            self.before_hold(user)
            available, held = ledger.lock_user(user.id)
            if available.balance < t["hold"]:
                self.refuse(user, t["hold"], available.balance, t["cost"], "to start this job")
            JobBilling.create(job_id=job.id, user_id=user.id, rate=t["rate"], device=t["device"], gpus=t["gpus"],
                              estimate_s=t["estimate_s"])
            ledger.post(f"hold:{job.id}", ledger.HOLD, [(available, -t["hold"]), (held, t["hold"])],
                        user_id=user.id, job_id=job.id,
                        description=(f"Job #{job.id}: hold for an estimated {credits_text(t['cost'])} {self.unit} "
                                     f"({t['device_seconds']:,.0f} device-seconds on {t['device']}) plus "
                                     f"{HOLD_MARGIN:.0%}"),
                        meta={"cost": t["cost"], "device_seconds": round(t["device_seconds"], 3)})
        notify("hold", job_id=job.id, user_id=user.id, amount=t["hold"])

    def account(self, user: User) -> dict[str, Any] | None:
        self.before_hold_outside(user)
        micro = ledger.balances(user.id)
        return {"mode": self.mode, "unit": self.unit, **{k: to_credits(v) for k, v in micro.items()},
                "micro_credits": micro, "packs": self.packs, "can_buy": self.can_buy()}


def cost_to_finish(job: TrainingJob, jb: JobBilling) -> int:
    """What the rest of a paused run should cost, from its own pace so far (else its estimate), plus the
    margin."""
    p = job.progress or {}
    total = p.get("total_steps") or (job.config or {}).get("max_steps") or 0
    done = p.get("checkpoint_step") or 0
    paid_s = metering._device_seconds(job.id)
    if done and total and paid_s:
        need_s = paid_s / done * max(0, total - done)
    else:
        need_s = (jb.estimate_s or 0.0) * jb.gpus * (1 - (done / total if total else 0))
    return ledger.cost_micro(max(need_s * (1 + HOLD_MARGIN), MIN_HOLD_DEVICE_S * jb.gpus), jb.rate)


class HostedBilling(_Charging):
    """Prepaid credits: prices per device-second, packs sold through Stripe, a verified email first."""

    mode = "hosted"

    @property
    def packs(self) -> list[dict]:
        return [{**p, "display": money_text(p["amount"], p["currency"])} for p in self.settings.credit_packs]

    def can_buy(self) -> bool:
        return bool(self.settings.credit_packs and self.settings.stripe_secret_key)

    def rate_for(self, device: dict[str, Any]) -> tuple[str, float]:
        prices = self.settings.prices
        kind = device.get("device", "cpu")
        if kind == "cuda":
            name = str(device.get("device_name") or "").lower()
            for key in sorted(prices, key=len, reverse=True):  # "H100 NVL" before "H100"
                if key not in ("cpu", "cuda", "mps") and key.lower() in name:
                    return key, prices[key] * MICRO
        if kind in prices:
            return kind, prices[kind] * MICRO
        raise BadRequest(f"this studio has no price for training on {kind} (NCS_PRICES); ask its administrator",
                         code="no_price")

    def require_verified(self, user: User, what: str) -> None:
        if not accounts.email_verified(user):
            notify("refused", user_id=user.id, reason="unverified")
            raise Forbidden(f"Verify your email address before you {what}: follow the link we sent you.",
                            code="email_unverified")

    def require_may_train(self, user: User) -> None:
        self.require_verified(user, "train")

    def money(self, micro: int) -> dict[str, Any] | None:
        """The cost in money at the best pack's price per credit (None without packs)."""
        packs = self.settings.credit_packs
        if not packs:
            return None
        best = min(packs, key=lambda p: p["amount"] / p["credits"])
        amount = math.ceil(to_credits(micro) * best["amount"] / best["credits"])
        return {"amount": amount, "currency": best["currency"], "display": money_text(amount, best["currency"])}


class LabBilling(_Charging):
    """Lab quotas: an admin gives a user a monthly device-hour allowance; beyond it submissions get 402.
    One credit here is one device-hour, on any device."""

    mode = "lab"
    unit = "device-hours"

    def applies_to(self, user: User) -> bool:
        return DeviceAllowance.get_or_none(DeviceAllowance.user_id == user.id) is not None

    def rate_for(self, device: dict[str, Any]) -> tuple[str, float]:
        return str(device.get("device") or "device"), LAB_RATE

    def before_hold(self, user: User) -> None:
        from .grants import refill_allowance

        refill_allowance(user.id)

    before_hold_outside = before_hold  # refill_allowance takes its own write transaction when it posts

    def top_up_hint(self) -> str:
        return "Ask an administrator to raise your monthly allowance, or wait for next month's."

    def account(self, user: User) -> dict[str, Any] | None:
        row = DeviceAllowance.get_or_none(DeviceAllowance.user_id == user.id)
        if row is None:
            return None
        return {**(super().account(user) or {}), "allowance_hours": row.hours}


def for_settings(settings: Settings) -> Billing:
    """The policy of ``settings.mode``."""
    if settings.mode == "hosted":
        return HostedBilling(settings)
    if settings.mode == "lab":
        return LabBilling(settings)
    return Billing(settings)


def money_text(amount: int, currency: str) -> str:
    if currency.lower() in ZERO_DECIMAL_CURRENCIES:
        return f"{amount:,} {currency.upper()}"
    return f"{amount / 100:,.2f} {currency.upper()}"
