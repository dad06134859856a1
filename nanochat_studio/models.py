"""The store's tables. Query helpers live here as model methods; state changes of jobs live in jobs.py.

Every table binds to ``database`` (a DatabaseProxy that db.py opens from a URL) so the same models serve
SQLite and PostgreSQL; this module imports nothing of the appliance.
Times are UTC, naive (``utcnow``); JSON columns hold dicts.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from typing import Any

import peewee as pw

database = pw.DatabaseProxy()


MAX_ID = 2**63 - 1  # ids are 64-bit: a larger number names nothing (and overflows SQLite's integers)


def parse_id(ident: Any) -> int | None:
    """``ident`` (an int, or a string from a URL or a JSON body) as a row id, or None when it cannot be
    one: not an integer, a bool, negative, zero or beyond 64 bits."""
    if isinstance(ident, bool):
        return None
    if isinstance(ident, str):
        text = ident.strip()
        if not text.isdigit() or len(text) > 19:  # isdigit: no sign, no "1e3", no "١" (not ASCII)
            return None
        ident = int(text) if text.isascii() else None
    if not isinstance(ident, int) or not 0 < ident <= MAX_ID:
        return None
    return ident


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class JSONField(pw.TextField):
    """A dict or list stored as JSON text (portable across SQLite and PostgreSQL)."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(value, separators=(",", ":"), default=str)

    def python_value(self, value: Any) -> Any:
        return None if value is None else json.loads(value)


class BaseModel(pw.Model):
    class Meta:
        database = database
        legacy_table_names = False

    # Tables whose rows belong to a user (a ``user`` column) are read through these two.
    @classmethod
    def owned_by(cls, user: Any) -> pw.ModelSelect:
        """The rows of ``user`` (a User or its id)."""
        return cls.select().where(cls.user == user)

    @classmethod
    def get_owned(cls, ident: Any, user: Any) -> Any:
        """``user``'s row ``ident`` (an int, or a string from a URL or a JSON body), or None for anyone
        else's, a missing one and a malformed id alike: the caller answers 404 for all three."""
        pk = parse_id(ident)
        return None if pk is None else cls.first_by(user=user, id=pk)

    @classmethod
    def first_by(cls, **equal: Any) -> Any:
        """The first row whose fields equal ``equal`` (``User.first_by(id=3)``), or None. What
        ``cls.select().where(...).first()`` returns, for the lookups every request makes (its user, the
        row it names): peewee writes a select's SQL anew on every call, ~0.15 ms for these tables, a
        tenth of a small API request's time; here the text is written once per table, fields and kind
        of database, each call converts its values as the fields do, and the row becomes an instance as
        peewee's cursor makes one (its generic cursor wrapper was another ~0.1 ms)."""
        fields = [cls._meta.fields[name] for name in equal]
        params = [f.db_value(v) for f, v in zip(fields, equal.values())]
        key = (cls, tuple(equal), type(cls._meta.database.obj))
        # (a None is written "IS NULL", without a parameter: such a lookup never uses or keeps the text)
        sql = None if None in params else _FIRST_BY_SQL.get(key)
        if sql is None:
            query = cls.select().where(*(f == v for f, v in zip(fields, equal.values()))).limit(1)
            sql, built = query.sql()
            if built != params + [1]:  # a value peewee writes differently: no cached text for it
                return query.first()
            _FIRST_BY_SQL[key] = sql
        row = cls._meta.database.execute_sql(sql, (*params, 1)).fetchone()
        if row is None:
            return None
        # the columns of select() are the table's fields in order; built as peewee's cursor does
        obj = cls(__no_default__=1, **{f.name: f.python_value(v) for f, v in zip(cls._meta.sorted_fields, row)})
        obj._dirty.clear()
        return obj


_FIRST_BY_SQL: dict[tuple, str] = {}


class User(BaseModel):
    email = pw.CharField(max_length=320, unique=True, null=True)
    name = pw.CharField(max_length=120, default="")
    password_hash = pw.CharField(max_length=255, null=True)  # None: OAuth-only account
    oauth_provider = pw.CharField(max_length=32, null=True)
    oauth_id = pw.CharField(max_length=255, null=True)
    is_admin = pw.BooleanField(default=False)
    is_approved = pw.BooleanField(default=True)  # lab mode: admin approval gate
    is_active_flag = pw.BooleanField(default=True, column_name="is_active")
    # Set when the person opened a confirmation link sent to ``email`` (or a provider vouched for it);
    # None: nobody proved they read mail at this address. accounts.email_verified() reads it.
    email_verified_at = pw.DateTimeField(null=True)
    # Every signed-in session carries the number it was started with; bumping it ends them all
    # (logout, a password change, "sign out everywhere", an admin disabling the account).
    session_version = pw.IntegerField(default=0)
    # Cached balance in micro-credits; the ledger is the truth (billing.py recomputes and checks it).
    credit_balance = pw.BigIntegerField(default=0)
    created_at = pw.DateTimeField(default=utcnow)
    last_login_at = pw.DateTimeField(null=True)

    class Meta:
        indexes = ((("oauth_provider", "oauth_id"), True),)

    # flask-login protocol
    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def is_active(self) -> bool:
        return bool(self.is_active_flag)

    @property
    def is_anonymous(self) -> bool:
        return False

    def get_id(self) -> str:
        return str(self.id)


class ApiKey(BaseModel):
    user = pw.ForeignKeyField(User, backref="api_keys", on_delete="CASCADE")
    name = pw.CharField(max_length=120, default="")
    prefix = pw.CharField(max_length=16, index=True)  # shown in lists: "ncs_ab12cd34"
    key_hash = pw.CharField(max_length=128, unique=True)  # sha256 of the whole key; the key is never stored
    created_at = pw.DateTimeField(default=utcnow)
    last_used_at = pw.DateTimeField(null=True)
    revoked_at = pw.DateTimeField(null=True)


class Dataset(BaseModel):
    """A user's uploaded (or fetched) dataset, kept in storage under the user's prefix."""

    user = pw.ForeignKeyField(User, backref="datasets", on_delete="CASCADE")
    name = pw.CharField(max_length=255)
    storage_key = pw.CharField(max_length=1024)
    size_bytes = pw.BigIntegerField(default=0)
    sha256 = pw.CharField(max_length=64, default="")
    # What the bytes expand to when read (gzip): what the quota and estimates count. 0: not gzipped,
    # the same as size_bytes.
    expanded_bytes = pw.BigIntegerField(default=0)
    created_at = pw.DateTimeField(default=utcnow)

    @property
    def counted_bytes(self) -> int:
        return max(self.size_bytes or 0, self.expanded_bytes or 0)


class TrainingJob(BaseModel):
    """One training run. Its ``status`` changes only through ``jobs.transition`` (compare-and-set)."""

    user = pw.ForeignKeyField(User, backref="jobs", on_delete="CASCADE")
    name = pw.CharField(max_length=120, default="")
    config = JSONField(default=dict)  # validated trainer config (depth, dataset, max_steps, ...)
    status = pw.CharField(max_length=16, default="queued", index=True)
    status_reason = pw.TextField(default="")
    error_kind = pw.CharField(max_length=16, null=True)  # "user" | "infrastructure"
    attempt = pw.IntegerField(default=0)  # fencing token: bumped on every (re)start
    max_attempts = pw.IntegerField(default=3)
    lease_owner = pw.CharField(max_length=128, null=True)
    lease_expires_at = pw.DateTimeField(null=True, index=True)
    not_before = pw.DateTimeField(null=True)  # retry back-off
    cancel_requested = pw.BooleanField(default=False)
    device = pw.CharField(max_length=64, null=True)
    estimate = JSONField(null=True)  # what the plan page showed: params, tokens, time, memory
    progress = JSONField(default=dict)  # latest step/total/loss/tokens_per_sec/eta_s/val_bpb
    last_event_seq = pw.IntegerField(default=0)
    output_path = pw.CharField(max_length=1024, null=True)  # run directory (local or storage URL)
    log_path = pw.CharField(max_length=1024, null=True)
    gpu_seconds = pw.FloatField(default=0.0)
    cost = pw.BigIntegerField(default=0)  # micro-credits charged (hosted mode)
    created_at = pw.DateTimeField(default=utcnow, index=True)
    queued_at = pw.DateTimeField(default=utcnow)
    started_at = pw.DateTimeField(null=True)
    finished_at = pw.DateTimeField(null=True)
    updated_at = pw.DateTimeField(default=utcnow)


class JobEvent(BaseModel):
    """One line of the trainer's progress contract or a lifecycle change; ``seq`` is the SSE event id."""

    job = pw.ForeignKeyField(TrainingJob, backref="events", on_delete="CASCADE")
    seq = pw.IntegerField()
    kind = pw.CharField(max_length=16)  # a trainer event name, or "state"
    attempt = pw.IntegerField(default=0)
    data = JSONField(default=dict)
    created_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("job", "seq"), True),)


class Model(BaseModel):
    """A trained model (or a mid-training snapshot) that can be chatted with and downloaded."""

    user = pw.ForeignKeyField(User, backref="models", on_delete="CASCADE")
    job = pw.ForeignKeyField(TrainingJob, backref="models", null=True, on_delete="SET NULL")
    name = pw.CharField(max_length=120)
    step = pw.IntegerField(default=0)
    is_snapshot = pw.BooleanField(default=False)  # a read-only copy taken mid-training
    # "base" (pretrained on raw text) or "chat" (chat-tuned: it answers in the chat template), from the
    # checkpoint's config at publish time (checkpoints.py)
    kind = pw.CharField(max_length=8, default="base")
    checkpoint_key = pw.CharField(max_length=1024)  # storage key of the checkpoint directory
    tokenizer_key = pw.CharField(max_length=1024)
    params = pw.BigIntegerField(default=0)
    config = JSONField(default=dict)
    metrics = JSONField(default=dict)  # final loss, val_bpb, tokens seen
    samples = JSONField(default=list)
    data_source = pw.CharField(max_length=1024, default="")
    data_sha256 = pw.CharField(max_length=64, default="")
    size_bytes = pw.BigIntegerField(default=0)
    created_at = pw.DateTimeField(default=utcnow)


class ChatSession(BaseModel):
    user = pw.ForeignKeyField(User, backref="chats", on_delete="CASCADE")
    model = pw.ForeignKeyField(Model, backref="chats", on_delete="CASCADE")
    title = pw.CharField(max_length=200, default="New chat")
    mode = pw.CharField(max_length=16, default="chat")  # one of inference.MODES
    settings = JSONField(default=dict)  # temperature, top_k, top_p, max_tokens
    created_at = pw.DateTimeField(default=utcnow)
    updated_at = pw.DateTimeField(default=utcnow)


class ChatMessage(BaseModel):
    session = pw.ForeignKeyField(ChatSession, backref="messages", on_delete="CASCADE")
    position = pw.IntegerField()
    role = pw.CharField(max_length=16)  # "user" | "assistant" | "system"
    content = pw.TextField()
    stats = JSONField(null=True)  # ttft_ms, tokens, tokens_per_sec, finish_reason
    created_at = pw.DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("session", "position"), True),)


class LedgerAccount(BaseModel):
    """A place credits sit: a user's ``available`` and ``held`` accounts, or a system account (``stripe``,
    ``revenue``, ``grants``, ``allowances``). ``balance`` caches the sum of its postings (micro-credits);
    billing/ledger.py changes it only in the transaction that inserts those postings. Never deleted.
    ``user_id`` is a plain id, not a foreign key: the ledger outlives the rows it mentions."""

    name = pw.CharField(max_length=64, unique=True)  # "user:7:available", "system:revenue"
    user_id = pw.IntegerField(null=True, index=True)
    kind = pw.CharField(max_length=16)  # "available" | "held" | "system"
    balance = pw.BigIntegerField(default=0)
    created_at = pw.DateTimeField(default=utcnow)


class LedgerTransaction(BaseModel):
    """One money movement: postings that sum to zero, under a unique idempotency ``key`` (a replayed
    webhook or a re-run settlement finds its key taken and does nothing). Append-only: triggers refuse
    UPDATE and DELETE on SQLite and PostgreSQL."""

    key = pw.CharField(max_length=255, unique=True)
    kind = pw.CharField(max_length=32, index=True)  # purchase, grant, hold, usage, credit_back, settle, ...
    user_id = pw.IntegerField(null=True, index=True)
    job_id = pw.IntegerField(null=True, index=True)
    description = pw.TextField(default="")  # the line the person reads: what and why
    meta = JSONField(default=dict)
    created_at = pw.DateTimeField(default=utcnow, index=True)


class LedgerPosting(BaseModel):
    """One leg of a transaction: ``amount`` micro-credits into (positive) or out of ``account``."""

    txn = pw.ForeignKeyField(LedgerTransaction, backref="postings", on_delete="RESTRICT")
    account = pw.ForeignKeyField(LedgerAccount, backref="postings", on_delete="RESTRICT")
    amount = pw.BigIntegerField()


class JobBilling(BaseModel):
    """The terms a billed job was accepted on: the price per device-second quoted at submission and the
    estimate behind its hold. A job without a row is not billed (solo mode, or a lab user without an
    allowance). ``settled_at`` marks the settlement (its ledger line is the truth)."""

    job_id = pw.IntegerField(primary_key=True)
    user_id = pw.IntegerField(index=True)
    rate = pw.FloatField()  # micro-credits per device-second
    device = pw.CharField(max_length=64)  # the price-table key that priced it
    gpus = pw.IntegerField(default=1)
    estimate_s = pw.FloatField(null=True)  # wall seconds the plan expected
    created_at = pw.DateTimeField(default=utcnow)
    settled_at = pw.DateTimeField(null=True, index=True)


class DeviceAllowance(BaseModel):
    """Lab mode: a user's monthly device-hour allowance, set by an admin (no row: no quota)."""

    user_id = pw.IntegerField(primary_key=True)
    hours = pw.FloatField()
    set_by = pw.IntegerField(null=True)
    updated_at = pw.DateTimeField(default=utcnow)


class StripeEvent(BaseModel):
    """Stripe events already handled (by event id): a redelivery answers at once. The ledger's keys
    (session, refund and dispute ids) are what make fulfilment idempotent; this is the fast path."""

    id = pw.CharField(max_length=255, primary_key=True)
    type = pw.CharField(max_length=64)
    received_at = pw.DateTimeField(default=utcnow)


class AppState(BaseModel):
    """Small persistent key/value facts (schema version, solo owner id, calibration cache)."""

    key = pw.CharField(max_length=128, primary_key=True)
    value = JSONField(null=True)


class WorkerProcess(BaseModel):
    """A process running a queue consumer, as it registered itself (workers.py): what it can train on, and
    when it last said it is alive. The web side reads these to know which workers exist."""

    id = pw.CharField(max_length=160, primary_key=True)  # jobs.owner_id(): host, boot, pid
    host = pw.CharField(max_length=255)
    pid = pw.IntegerField()
    role = pw.CharField(max_length=16)  # "serve" (in-process consumer) | "worker"
    devices = JSONField(default=list)  # one per slot: slot, device, device_name, memory_bytes, gpu, uuid
    gpu_count = pw.IntegerField(default=0)
    metrics_port = pw.IntegerField(null=True)
    version = pw.CharField(max_length=32, default="")
    beat_seconds = pw.FloatField(default=12.0)  # how often it renews last_seen_at
    started_at = pw.DateTimeField(default=utcnow)
    last_seen_at = pw.DateTimeField(default=utcnow, index=True)


class GpuQuarantine(BaseModel):
    """A GPU taken out of service after a device error (quarantine.py); the row is deleted when a health
    probe passes or an admin clears it. ``uuid`` (NVML's) follows the card wherever its host name goes."""

    host = pw.CharField(max_length=255)
    gpu = pw.CharField(max_length=16)  # the index CUDA_VISIBLE_DEVICES names on that host
    uuid = pw.CharField(max_length=96, null=True, index=True)
    device_name = pw.CharField(max_length=255, default="")
    fault = pw.CharField(max_length=32)  # trainer.progress.DEVICE_FAULTS, or "xid"
    reason = pw.TextField(default="")
    job = pw.ForeignKeyField(TrainingJob, null=True, backref="quarantines", on_delete="SET NULL")
    created_at = pw.DateTimeField(default=utcnow)
    probe_at = pw.DateTimeField(null=True)  # the next health probe; None: only an admin clears it
    probes = pw.IntegerField(default=0)
    last_probe = pw.TextField(default="")  # what the last failed probe said

    class Meta:
        indexes = ((("host", "gpu"), True),)


ALL_MODELS = [User, ApiKey, Dataset, TrainingJob, JobEvent, Model, ChatSession, ChatMessage, AppState,
              WorkerProcess, GpuQuarantine]
# billing/ledger.py's migration creates these (with the triggers that keep the ledger append-only).
BILLING_MODELS = [LedgerAccount, LedgerTransaction, LedgerPosting, JobBilling, DeviceAllowance, StripeEvent]


def new_token(nbytes: int = 24) -> str:
    return secrets.token_urlsafe(nbytes)
