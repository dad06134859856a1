"""Settings: the one reader of ``NCS_*`` environment variables and of the optional TOML file.

``load_settings()`` builds a frozen :class:`Settings` once, at start. Precedence, highest first:
keyword overrides (the CLI's flags) > environment (``NCS_<NAME>``, or ``NCS_<NAME>_FILE`` for secrets)
> TOML file (``NCS_CONFIG`` or ``--config``; keys are the field names) > defaults. A bad value raises
:class:`SettingsError` naming the setting. Every field carries a ``doc``; ``python -m nanochat_studio
settings --markdown`` prints the table the README shows. How one field is declared, named in the
environment and converted lives in settingfields.py; which settings exist, and the checks across them,
here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import platformdirs

from .settingfields import SettingsError, convert, env_name, mask
from .settingfields import field as _f  # every setting below is declared with it

MODES = ("solo", "lab", "hosted")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
SECRET_KEY_FILE = "secret_key"
GiB = 1 << 30
# waitress threads that event streams can never hold (threads = max_streams + this, by default): pages,
# /healthz and sign-ins still get answered while every stream slot is taken.
THREADS_SPARE = 8
THREADS_SPARE_MIN = 4
SMTP_SCHEMES = ("smtp", "smtps", "smtp+insecure")
RATE_LIMIT_SETTINGS = ("login_limit_per_account", "login_limit_per_address", "api_rate_limit",
                       "api_key_rate_limit")


@dataclasses.dataclass(frozen=True)
class Settings:
    # --- where things live ---
    home: str = _f("", "Data directory: SQLite database, queue, storage, logs, trainer runs, secret key.",
                   default_doc='the platform\'s user data dir for "nanochat-studio"')
    mode: str = _f("solo", "solo: one person, no sign-in from this machine; lab: accounts, admin approves or "
                   "invites; hosted: accounts plus billing.", choices=MODES)
    host: str = _f("127.0.0.1", "Address `serve` binds to. Anything but loopback exposes the app to the network.")
    port: int = _f(8765, "Port `serve` listens on; 0 picks a free one and prints it.", minimum=0, maximum=65535)
    secret_key: str = _f("", "Signs sessions and CSRF tokens. Generated into `{home}/secret_key` (mode 0600) on "
                         "first run when unset.", secret=True, default_doc="generated, persisted")
    database_url: str = _f("", "The store: `sqlite:///path` or `postgresql://user:pass@host:port/db`.",
                           secret=True, default_doc="sqlite:///{home}/studio.db")
    queue_url: str = _f("", "huey queue storage: `sqlite:///path`, `redis://host:port/db` or `postgresql://...`.",
                        secret=True, default_doc="sqlite:///{home}/queue.db")
    storage_url: str = _f("", "Where models, datasets and logs are kept: any fsspec URL, e.g. "
                          "`s3://bucket/prefix`.", default_doc="file://{home}/storage")
    storage_options: dict = _f({}, "JSON object of fsspec options for storage_url (endpoint_url, key, "
                               "secret, ...).", secret=True)
    runs_dir: str = _f("", "Local working directories of trainer runs (checkpoints while training).",
                       default_doc="{home}/runs")
    base_url: str = _f("", "Public URL of the app (https://studio.example.org) behind a proxy: OAuth "
                       "redirect URIs, allowed host, Secure cookies.", default_doc="derived from the request")
    allowed_hosts: str = _f("", "Comma-separated Host header names accepted (DNS-rebinding guard); `*` accepts "
                            "any.", default_doc="loopback names, host and base_url's host")
    log_level: str = _f("info", "Logging level.", choices=LOG_LEVELS)
    log_format: str = _f("text", "Log lines: `text` for people, `json` for one object per line (time, level, "
                         "logger, message, request_id, user_id, job_id) for a log collector.", choices=LOG_FORMATS)
    metrics_token: str = _f("", "Bearer token that lets Prometheus read `/metrics` (and a worker's "
                            "`--metrics-port`) from another machine; without it they answer loopback only.",
                            secret=True)
    trusted_proxy: str = _f("", "Address of the reverse proxy in front of `serve` (lab and hosted only): its "
                            "X-Forwarded-For and X-Forwarded-Proto are believed, so rate limits see the real "
                            "client address. Solo mode refuses it: behind a proxy, run lab.")
    # --- serving and the queue ---
    threads: int = _f(0, "waitress threads; 0 sizes them from the stream caps: max_streams plus "
                      "threads that streams can never take.", minimum=0, maximum=1024,
                      default_doc="0 (max_streams + 8)")
    max_streams: int = _f(32, "Open event streams (job events, chat, model downloads) of all users together; "
                          "one more answers 429.", minimum=1, maximum=1000)
    max_streams_per_user: int = _f(6, "Open event streams of one user (or API key's owner); one more answers "
                                   "429.", minimum=1, maximum=1000)
    json_max_bytes: int = _f(1 << 20, "Largest request body of anything but a dataset upload, in bytes.",
                             minimum=1024)
    worker: bool = _f(True, "Run the queue consumer inside `serve` (turn off when `worker` runs elsewhere).")
    worker_threads: int = _f(4, "huey consumer worker threads.", minimum=1, maximum=256)
    cpu_slots: int = _f(1, "Training jobs run at once on the CPU when there is no GPU.", minimum=1, maximum=256)
    gpus: str = _f("auto", "GPUs this process trains on: `auto`, `none` or a list like `0,1`.")
    trainer_python: str = _f("", "Python interpreter that runs the trainer.", default_doc="this interpreter")
    trainer_module: str = _f("trainer.train", "Module run as `python -m` for training (tests use a fake).")
    lease_seconds: float = _f(30.0, "Lease of a running job; heartbeats renew it every third of it.",
                              minimum=1)
    max_attempts: int = _f(3, "Attempts of a job that fails for infrastructure reasons.", minimum=1, maximum=100)
    retry_backoff_seconds: float = _f(10.0, "First retry waits this long, then doubles.", minimum=0)
    reconcile_seconds: float = _f(12.0, "How often the worker re-checks leases and starts waiting jobs.",
                                  minimum=0.05)
    term_grace_seconds: float = _f(120.0, "How long a stopped trainer may take to checkpoint before it is "
                                   "killed.", minimum=0)
    mirror_checkpoints: bool | None = _f(None, "Copy a running job's checkpoints and log tail into storage (a "
                                         "sidecar process per job), so the web and a worker on other machines "
                                         "need no shared disk: `true`, `false` or `auto`.",
                                         default_doc="auto: on when storage_url is remote")
    gpu_probe_seconds: float = _f(600.0, "A GPU quarantined after a device error gets a health probe this long "
                                  "after, and again as often until one passes; 0 leaves it to an admin.",
                                  minimum=0)
    max_running_jobs: int = _f(2, "Running jobs per user.", minimum=1)
    max_queued_jobs: int = _f(10, "Waiting jobs per user before submissions get 429.", minimum=1)
    # --- data ---
    upload_max_bytes: int = _f(2 * GiB, "Largest single dataset upload, in bytes.", minimum=1)
    expanded_max_bytes: int = _f(8 * GiB, "Largest size a gzipped dataset may expand to, in bytes; expanded "
                                 "bytes are what the quota and estimates count.", minimum=1)
    user_quota_bytes: int = _f(20 * GiB, "Dataset storage per user, in bytes.", minimum=0)
    url_max_bytes: int = _f(5 * GiB, "Largest dataset fetched from an https URL, in bytes.", minimum=1)
    url_timeout_s: float = _f(600.0, "Time limit of one dataset download, in seconds.", env="NCS_URL_TIMEOUT",
                              minimum=1)
    allow_private_urls: bool = _f(False, "Allow dataset URLs that resolve to private or loopback addresses "
                                  "(lab networks).")
    allow_server_paths: bool | None = _f(None, "Allow datasets given as paths on the server's disk.",
                                         default_doc="true in solo mode, else admins only")
    server_path_roots: str = _f("", "Comma-separated directories that server-path datasets must lie in. Paths "
                                "inside the data directory, system directories and hidden ones are refused "
                                "either way.", default_doc="anywhere else")
    # --- chat ---
    inference_device: str = _f("auto", "Device of model servers: `auto`, `cpu`, `cuda`, `cuda:1`.")
    max_loaded_models: int = _f(2, "Model servers kept warm (least recently used is stopped).", minimum=1)
    model_idle_seconds: int = _f(600, "An unused model server stops after this many seconds.", minimum=1)
    chat_queue_limit: int = _f(16, "Waiting chat requests per model before 429.", minimum=1)
    # --- sign-in, sessions and throttling ---
    session_max_age_hours: float = _f(12.0, "A sign-in lasts this long, then the person signs in again.",
                                      minimum=0.01)
    login_limit_per_account: str = _f("10 per minute; 100 per hour", "Failed sign-ins per account "
                                      "(the limits library's notation); beyond, 429 with Retry-After.")
    login_limit_per_address: str = _f("30 per minute; 300 per hour", "Sign-in, sign-up and email attempts "
                                      "per client address; beyond, 429 with Retry-After.")
    api_rate_limit: str = _f("600 per minute", "Requests to /api and /v1 per user, all their keys and "
                             "sessions together; beyond, 429 with Retry-After.")
    api_key_rate_limit: str = _f("300 per minute", "Requests to /api and /v1 per API key.")
    password_hash_concurrency: int = _f(2, "Password hashes computed at once (each scrypt takes ~32 MiB); "
                                        "a sign-in that waits too long for one answers 429.", minimum=1,
                                        maximum=64)
    # --- email (verification links) ---
    smtp_url: str = _f("", "Mail server: `smtp://host:587` (STARTTLS), `smtps://host:465` (TLS) or "
                       "`smtp+insecure://host:25` (plain, a relay on this machine). Empty: links are "
                       "logged instead (solo and lab); hosted mode needs it.", secret=True)
    smtp_from: str = _f("", "From address of the studio's mail.", default_doc="studio@{base_url's host}")
    smtp_username: str = _f("", "SMTP user name.", secret=True)
    smtp_password: str = _f("", "SMTP password.", secret=True)
    email_link_hours: float = _f(24.0, "How long an email confirmation link works.", minimum=0.01)
    # --- sign-in providers (off unless a client id is set) ---
    github_client_id: str = _f("", "GitHub OAuth app client id; empty turns GitHub sign-in off.")
    github_client_secret: str = _f("", "GitHub OAuth app client secret.", secret=True)
    github_base_url: str = _f("https://github.com", "GitHub's web URL (tests point it at a local provider).")
    github_api_url: str = _f("https://api.github.com", "GitHub's API URL.")
    google_client_id: str = _f("", "Google OAuth client id; empty turns Google sign-in off.")
    google_client_secret: str = _f("", "Google OAuth client secret.", secret=True)
    google_discovery_url: str = _f("https://accounts.google.com/.well-known/openid-configuration",
                                   "Google's OpenID Connect discovery document.")
    # --- billing (hosted mode: prepaid credits; lab mode: device-hour allowances) ---
    prices: dict = _f({"cpu": 0.0001, "cuda": 0.001}, "JSON object of credits per device-second by device kind: "
                      '`"cpu"`, `"cuda"` (any GPU) or a GPU model name such as `"H100"` (matched in the GPU\'s '
                      "name; wins over `cuda`). Hosted mode charges these.")
    credit_packs: list = _f([], 'JSON list of the credit packs sold: `{"id", "credits", "amount", "currency"}`, '
                            "amount in the currency's minor units, optional `\"price\"` (a Stripe Price id). "
                            "Empty: nothing for sale.")
    signup_credits: float = _f(0.0, "Credits granted once to a hosted account when its email is verified.",
                               minimum=0, maximum=1e9)
    stripe_secret_key: str = _f("", "Stripe secret API key (hosted mode); empty: buying credits is off.",
                                secret=True)
    stripe_webhook_secret: str = _f("", "Stripe webhook signing secret(s), comma-separated while rotating; "
                                    "`POST /stripe/webhook` accepts an event signed with any of them.", secret=True)
    stripe_api_base: str = _f("https://api.stripe.com", "Stripe's API URL (tests point it at a local fake).")

    @property
    def home_path(self) -> Path:
        return Path(self.home)

    def public(self) -> dict[str, Any]:
        """Effective values with secrets masked (for `settings` and logs)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = mask(value)
            out[f.name] = value
        return out


# ------------------------------------------------------------------------------------------- reading

def _read_secret_file(name: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"NCS_CONFIG: cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"NCS_CONFIG: {path} is not valid TOML: {exc}") from None
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"NCS_CONFIG: unknown setting(s) in {path}: {', '.join(unknown)}")
    return data


def _generated_secret(home: Path) -> str:
    """The persisted secret key, created (0600) on first run; never a constant."""
    path = home / SECRET_KEY_FILE
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = ""
    except OSError as exc:
        raise SettingsError(f"NCS_SECRET_KEY: cannot read {path}: {exc.strerror or exc}") from None
    if existing:
        return existing
    key = secrets.token_urlsafe(48)
    try:
        home.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes starting at once agree on the first key written.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip() or key
    except OSError as exc:
        raise SettingsError(f"NCS_HOME: cannot write {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key + "\n")
    return key


def load_settings(environ: Mapping[str, str] | None = None, toml_path: str | os.PathLike | None = None,
                  **overrides: Any) -> Settings:
    """Build the settings from overrides > environment > TOML > defaults, validated.

    ``environ`` defaults to ``os.environ``; pass a dict in tests. Overrides whose value is None are
    ignored (unset CLI flags). Raises :class:`SettingsError` naming the setting on a bad value.
    """
    env = dict(os.environ if environ is None else environ)
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise SettingsError(f"unknown setting(s): {', '.join(unknown)}")
    toml_path = toml_path or env.get("NCS_CONFIG") or None
    from_toml = _read_toml(str(toml_path)) if toml_path else {}

    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = env_name(f)
        if overrides.get(name) is not None:
            values[name] = convert(f, overrides[name], "the command line")
        elif env.get(key, "") != "":
            values[name] = convert(f, env[key], "the environment")
        elif f.metadata["secret"] and env.get(key + "_FILE"):
            values[name] = convert(f, _read_secret_file(key + "_FILE", env[key + "_FILE"]), key + "_FILE")
        elif name in from_toml:
            values[name] = convert(f, from_toml[name], str(toml_path))

    home = Path(values.get("home") or platformdirs.user_data_dir("nanochat-studio")).expanduser().resolve()
    values["home"] = str(home)
    mode = values.get("mode", "solo")
    values.setdefault("database_url", f"sqlite:///{home}/studio.db")
    values.setdefault("queue_url", f"sqlite:///{home}/queue.db")
    values.setdefault("storage_url", f"file://{home}/storage")
    values.setdefault("runs_dir", str(home / "runs"))
    values.setdefault("trainer_python", sys.executable)
    if values.get("allow_server_paths") is None:
        values["allow_server_paths"] = mode == "solo"
    _check_urls(values)
    _check_billing(values)
    _check_serving(values)
    if not values.get("secret_key"):
        values["secret_key"] = _generated_secret(home)
    elif len(values["secret_key"]) < 16:
        raise SettingsError("NCS_SECRET_KEY: too short; use at least 16 random characters")
    if values.get("metrics_token") and len(values["metrics_token"]) < 16:
        # a bearer token is all that stands between the network and /metrics: no guessable placeholders
        raise SettingsError("NCS_METRICS_TOKEN: too short; use at least 16 random characters")
    return Settings(**values)


def _check_urls(values: dict[str, Any]) -> None:
    schemes = {
        "database_url": ("sqlite", "postgres", "postgresql"),
        "queue_url": ("sqlite", "redis", "rediss", "postgres", "postgresql"),
    }
    for name, allowed in schemes.items():
        scheme = urlsplit(values[name]).scheme.split("+")[0]
        if scheme not in allowed:
            raise SettingsError(f"NCS_{name.upper()}: expected a URL starting with "
                                f"{' or '.join(s + '://' for s in allowed)}, got {values[name]!r}")
    if not urlsplit(values["storage_url"]).scheme:
        raise SettingsError(f"NCS_STORAGE_URL: expected a URL like file:///path or s3://bucket/prefix, "
                            f"got {values['storage_url']!r}")
    base = values.get("base_url", "")
    if base:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f"NCS_BASE_URL: expected http(s)://host[:port][/path], got {base!r}")
    gpus = values.get("gpus", "auto").replace(" ", "")
    if gpus not in ("auto", "none") and not all(p.isdigit() for p in gpus.split(",")):
        raise SettingsError(f"NCS_GPUS: expected auto, none or a list like 0,1, got {gpus!r}")
    values["gpus"] = gpus


_CURRENCY_LETTERS = set("abcdefghijklmnopqrstuvwxyz")


def _check_billing(values: dict[str, Any]) -> None:
    """Prices and packs are money: a malformed one stops the start, naming the setting and the entry."""
    prices = values.get("prices", Settings.__dataclass_fields__["prices"].default_factory())  # type: ignore[misc]
    for key, price in prices.items():
        if (not isinstance(key, str) or not key.strip() or isinstance(price, bool)
                or not isinstance(price, (int, float)) or not math.isfinite(price) or price < 0):
            raise SettingsError(f"NCS_PRICES: expected credits per device-second (a number >= 0) for each device "
                                f"kind, got {key!r}: {price!r}")
    values["prices"] = {k.strip(): float(v) for k, v in prices.items()}
    packs = values.get("credit_packs", [])
    seen: set[str] = set()
    clean = []
    for i, pack in enumerate(packs):
        where = f"NCS_CREDIT_PACKS: pack {i + 1}"
        if not isinstance(pack, dict):
            raise SettingsError(f"{where}: expected an object with id, credits, amount and currency")
        unknown = sorted(set(pack) - {"id", "credits", "amount", "currency", "price"})
        if unknown:
            raise SettingsError(f"{where}: unknown key(s) {', '.join(unknown)}")
        pid, credits, amount, currency = (pack.get(k) for k in ("id", "credits", "amount", "currency"))
        if not isinstance(pid, str) or not pid.strip() or len(pid) > 64:
            raise SettingsError(f"{where}: 'id' must be a short non-empty string")
        if pid in seen:
            raise SettingsError(f"{where}: the id {pid!r} is used twice")
        seen.add(pid)
        if isinstance(credits, bool) or not isinstance(credits, (int, float)) or not math.isfinite(credits) \
                or credits <= 0:
            raise SettingsError(f"{where} ({pid}): 'credits' must be a number above 0")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise SettingsError(f"{where} ({pid}): 'amount' must be a whole number of the currency's minor "
                                "units above 0 (e.g. 500 for $5.00)")
        if not isinstance(currency, str) or len(currency) != 3 or not set(currency.lower()) <= _CURRENCY_LETTERS:
            raise SettingsError(f"{where} ({pid}): 'currency' must be a three-letter ISO code like usd")
        price = pack.get("price")
        if price is not None and (not isinstance(price, str) or not price.startswith("price_")):
            raise SettingsError(f"{where} ({pid}): 'price' must be a Stripe Price id (price_...)")
        clean.append({"id": pid, "credits": credits, "amount": amount, "currency": currency.lower(),
                      **({"price": price} if price else {})})
    values["credit_packs"] = clean
    base = values.get("stripe_api_base", "")
    if base:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f"NCS_STRIPE_API_BASE: expected http(s)://host[:port], got {base!r}")
        values["stripe_api_base"] = base.rstrip("/")


def _check_serving(values: dict[str, Any]) -> None:
    """Threads, proxies, rate-limit strings, mail and server-path roots: the checks across settings."""
    max_streams = values.get("max_streams", Settings.max_streams)
    threads = values.get("threads", 0)
    if threads == 0:
        values["threads"] = max_streams + THREADS_SPARE
    elif threads < max_streams + THREADS_SPARE_MIN:
        raise SettingsError(f"NCS_THREADS: {threads} threads leave too few for anything but streams; use at "
                            f"least max_streams + {THREADS_SPARE_MIN} = {max_streams + THREADS_SPARE_MIN}, "
                            "or 0 to size them from max_streams")
    if values.get("trusted_proxy") and values.get("mode", "solo") == "solo":
        raise SettingsError("NCS_TRUSTED_PROXY: solo mode trusts only this machine's own browser and cannot run "
                            "behind a proxy (every visitor would be the owner); use lab mode")
    for name in RATE_LIMIT_SETTINGS:
        if name in values:
            from limits import parse_many

            try:
                parse_many(values[name])
            except ValueError:
                raise SettingsError(f"NCS_{name.upper()}: expected limits like '10 per minute; 100 per hour', "
                                    f"got {values[name]!r}") from None
    smtp = values.get("smtp_url", "")
    if smtp:
        parts = urlsplit(smtp)
        if parts.scheme not in SMTP_SCHEMES or not parts.hostname:
            raise SettingsError(f"NCS_SMTP_URL: expected smtp://host:587, smtps://host:465 or "
                                f"smtp+insecure://host:25, got {mask(smtp)!r}")
    roots = [r.strip() for r in values.get("server_path_roots", "").split(",") if r.strip()]
    for root in roots:
        if not os.path.isabs(root):
            raise SettingsError(f"NCS_SERVER_PATH_ROOTS: {root!r} is not an absolute directory")


# ------------------------------------------------------------------------------------- documentation

def default_text(f: dataclasses.Field) -> str:
    if f.metadata["default_doc"]:
        return f.metadata["default_doc"]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, (dict, list)):
        return json.dumps(default)
    if isinstance(default, int) and default >= GiB and default % GiB == 0:
        return f"{default} ({default // GiB} GiB)"
    return str(default) if default != "" else '""'


def markdown_table() -> str:
    """The README's configuration table, generated from the dataclass."""
    lines = ["| setting | environment | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        env = f"`{env_name(f)}`" + (f" / `{env_name(f)}_FILE`" if f.metadata["secret"] else "")
        doc = f.metadata["doc"].replace("|", "\\|")
        lines.append(f"| `{f.name}` | {env} | `{default_text(f)}` | {doc} |")
    return "\n".join(lines) + "\n"
