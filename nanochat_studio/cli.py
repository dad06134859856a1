"""The ``nanochat-studio`` command. With no subcommand it serves the app (same as ``serve``).

    nanochat-studio                      # serve on http://127.0.0.1:8765, queue consumer included
    nanochat-studio serve --port 0 --open
    nanochat-studio worker               # a queue consumer alone (another machine, same database/queue)
    nanochat-studio migrate
    nanochat-studio users create alice@example.org --admin
    nanochat-studio keys create          # a key for the solo owner, printed alone on the last line
    nanochat-studio credits grant alice@example.org 50 --reason "workshop"
    nanochat-studio billing audit        # exits 1 on any broken ledger invariant
    nanochat-studio settings --markdown

Every failure is a one-line message (``click.ClickException``), never a traceback. The money commands
(credits, billing) live in cli_billing.py; what every command runs with in cli_context.py.
"""

from __future__ import annotations

import signal
import sys
import threading
import webbrowser
from typing import Any

import click

from . import __version__, db
from .cli_billing import billing_group, credits_group
from .cli_context import Context, clean_errors, opened_store, pass_ctx, user_by_email
from .settings import Settings, markdown_table


class ServeByDefault(click.Group):
    """``nanochat-studio --port 0 --open`` means ``nanochat-studio serve --port 0 --open``."""

    GROUP_OPTIONS_WITH_VALUES = ("--config", "--home")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        i = 0
        while i < len(args) and args[i].split("=", 1)[0] in self.GROUP_OPTIONS_WITH_VALUES:
            i += 1 if "=" in args[i] else 2
        if i < len(args) and args[i] not in self.commands and args[i] not in ("-h", "--help", "--version"):
            args = [*args[:i], "serve", *args[i:]]
        return super().parse_args(ctx, args)


@click.group(cls=ServeByDefault, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), default=None, envvar="NCS_CONFIG",
              help="TOML settings file (keys are the setting names).")
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="Data directory (NCS_HOME).")
@click.version_option(__version__, prog_name="nanochat-studio")
@click.pass_context
def main(ctx: click.Context, config: str | None, home: str | None) -> None:
    """nanochat studio: train a small GPT from scratch, watch it learn, chat with it, download it."""
    ctx.obj = Context(config, home)
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


# ------------------------------------------------------------------------------------------ serve

@main.command()
@click.option("--host", default=None, help="Bind address [default: 127.0.0.1]. 0.0.0.0 exposes the app.")
@click.option("--port", type=int, default=None, help="Port [default: 8765]; 0 picks a free one.")
@click.option("--mode", type=click.Choice(["solo", "lab", "hosted"]), default=None, help="Override NCS_MODE.")
@click.option("--worker/--no-worker", "worker", default=None,
              help="Run the queue consumer in this process [default: on].")
@click.option("--demo", is_flag=True, help="Solo mode on this machine only, whatever the configuration says.")
@click.option("--open", "open_browser", is_flag=True, help="Open the app in a browser once it listens.")
@pass_ctx
@clean_errors
def serve(obj: Context, host: str | None, port: int | None, mode: str | None, worker: bool | None, demo: bool,
          open_browser: bool) -> None:
    """Serve the web app with waitress (the default command)."""
    if demo:
        mode, host = "solo", "127.0.0.1"
    settings = obj.settings(host=host, port=port, mode=mode, worker=worker)
    from . import mail, secretbox, tasks
    from .app import create_app
    from .webserver import create_server

    if settings.mode == "hosted" and not mail.configured(settings):
        raise click.ClickException("NCS_SMTP_URL: hosted mode mails a link to confirm every sign-up; set "
                                   "smtp_url (e.g. smtp://mail.example.org:587)")
    secretbox.make_private(settings)  # before anything writes into the data directory
    app = create_app(settings)
    try:
        server = create_server(app, **waitress_options(settings))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}. "
                                   "Pick another with --port (0 = any free port).") from None
    port_bound = server.effective_port  # the real one when --port 0
    url = f"http://{_browse_host(settings.host)}:{port_bound}/"
    handle = tasks.start_consumer(settings) if settings.worker else None

    def stop(*_: Any) -> None:
        # Unwinds waitress's loop in the main thread; waitress then lets running requests finish
        # (closing its sockets from here instead races the request threads still writing).
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    click.echo(f"nanochat studio {__version__} ({settings.mode} mode, data in {settings.home})")
    _print_setup_link(settings, url)
    click.echo(f"Serving on {url}", color=False)
    sys.stdout.flush()
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        server.run()  # returns after Ctrl-C or SIGTERM, once request threads are done
    finally:
        click.echo("Stopping…")
        if handle is not None:
            tasks.stop_consumer(handle)
        server.close()


# The body waitress accepts: an upload of upload_max_bytes plus its multipart framing. The app refuses
# more exactly (413 JSON); waitress's own limit (1 GiB by default) must not cut below what is advertised.
BODY_SLACK = 1 << 20


def waitress_options(settings: Settings) -> dict[str, Any]:
    """How `serve` runs waitress. Threads come from the stream caps (settings). With no
    ``trusted_proxy``, proxy headers reach the app as sent (waitress would otherwise delete them, and
    the app could no longer tell that a loopback request came through a proxy); with one, waitress
    believes that proxy's X-Forwarded-For/-Proto and removes the rest."""
    options: dict[str, Any] = dict(host=settings.host, port=settings.port, threads=settings.threads,
                                   ident="nanochat-studio", channel_timeout=120,
                                   max_request_body_size=settings.upload_max_bytes + BODY_SLACK)
    if settings.trusted_proxy:
        options.update(trusted_proxy=settings.trusted_proxy, trusted_proxy_count=1,
                       trusted_proxy_headers={"x-forwarded-for", "x-forwarded-proto"},
                       clear_untrusted_proxy_headers=True)
    else:
        options.update(clear_untrusted_proxy_headers=False)
    return options


def _print_setup_link(settings: Settings, url: str) -> None:
    """Lab and hosted installs without an administrator print a one-time link that creates one."""
    if settings.mode == "solo":
        return
    from . import bootstrap

    with db.database.connection_context():
        token = bootstrap.issue_setup_token()
    if token:
        base = settings.base_url.rstrip("/") + "/" if settings.base_url else url
        click.echo("No administrator yet. Create one with this link (it works once):")
        click.echo(f"  {base}account/setup?token={token}")
        click.echo("  (or: nanochat-studio users create EMAIL --admin)")


def _browse_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


# ----------------------------------------------------------------------------------- worker, migrate

@main.command()
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve /metrics (and /healthz) on this port for Prometheus; 0 picks a free one.")
@click.option("--metrics-host", default=None,
              help="Address the metrics port binds to [default: the host setting, 127.0.0.1].")
@pass_ctx
@clean_errors
def worker(obj: Context, metrics_port: int | None, metrics_host: str | None) -> None:
    """Run a queue consumer alone (trains jobs from the shared database and queue)."""
    settings = obj.settings()
    from . import logs, secretbox, tasks

    logs.configure(settings)
    secretbox.make_private(settings)
    with opened_store(settings):
        pass
    click.echo(f"worker: consuming {settings.queue_url}")

    def listening(port: int) -> None:
        host = metrics_host or settings.host
        click.echo(f"worker: metrics on http://{_browse_host(host)}:{port}/metrics", color=False)
        sys.stdout.flush()

    try:
        tasks.run_worker(settings, metrics_port=metrics_port, metrics_host=metrics_host, on_listening=listening)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on port {metrics_port} for metrics: {exc.strerror or exc}") from None


@main.command()
@pass_ctx
@clean_errors
def migrate(obj: Context) -> None:
    """Apply pending database migrations."""
    from . import secretbox

    settings = obj.settings()
    secretbox.make_private(settings)
    database = db.open_database(settings.database_url)
    try:
        applied = db.migrate(database)
    finally:
        database.close()
    if applied:
        click.echo("applied migration(s): " + ", ".join(str(v) for v in applied))
    else:
        click.echo("database is up to date")


# ------------------------------------------------------------------------------------------- users

@main.group()
def users() -> None:
    """Create, list and promote accounts."""


@users.command("create")
@click.argument("email")
@click.option("--name", default="", help="Display name.")
@click.option("--password", default=None, help="Password; prompted when --prompt-password is given.")
@click.option("--prompt-password", is_flag=True, help="Ask for the password (hidden).")
@click.option("--admin", is_flag=True, help="Make the account an administrator.")
@pass_ctx
@clean_errors
def users_create(obj: Context, email: str, name: str, password: str | None, prompt_password: bool,
                 admin: bool) -> None:
    """Create an approved account."""
    from . import auth

    if prompt_password:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with opened_store(obj.settings()):
        user = auth.create_user(email, password=password, name=name, is_admin=admin)
        click.echo(f"created user {user.id} {user.email}{' (admin)' if user.is_admin else ''}")


@users.command("list")
@pass_ctx
@clean_errors
def users_list(obj: Context) -> None:
    """List accounts."""
    from .models import User

    with opened_store(obj.settings()):
        rows = list(User.select().order_by(User.id))
        if not rows:
            click.echo("no users")
        for u in rows:
            flags = [f for f, on in (("admin", u.is_admin), ("pending", not u.is_approved),
                                     ("disabled", not u.is_active)) if on]
            click.echo(f"{u.id}\t{u.email or '-'}\t{u.name or '-'}\t{','.join(flags) or '-'}")


@users.command("promote")
@click.argument("email")
@pass_ctx
@clean_errors
def users_promote(obj: Context, email: str) -> None:
    """Make an account an administrator (and approve it)."""
    with opened_store(obj.settings()):
        user = user_by_email(email)
        user.is_admin = True
        user.is_approved = True
        user.save()
        click.echo(f"{user.email} is now an administrator")


@users.command("disable")
@click.argument("email")
@pass_ctx
@clean_errors
def users_disable(obj: Context, email: str) -> None:
    """Disable an account: its sessions end and its API keys stop working."""
    from . import accounts

    with opened_store(obj.settings()):
        user = user_by_email(email)
        accounts.set_active(user, False)
        click.echo(f"{user.email} is disabled and signed out everywhere")


@users.command("enable")
@click.argument("email")
@pass_ctx
@clean_errors
def users_enable(obj: Context, email: str) -> None:
    """Let a disabled account sign in again."""
    from . import accounts

    with opened_store(obj.settings()):
        user = user_by_email(email)
        accounts.set_active(user, True)
        click.echo(f"{user.email} can sign in again")


# -------------------------------------------------------------------------------------------- keys

@main.group()
def keys() -> None:
    """Create and revoke API keys."""


@keys.command("create")
@click.option("--user", "email", default=None, help="Owner's email [default: the solo owner].")
@click.option("--name", default="cli", help="A name to recognise the key by.")
@pass_ctx
@clean_errors
def keys_create(obj: Context, email: str | None, name: str) -> None:
    """Create an API key; the key is printed alone on the last line, and only once."""
    from . import auth

    settings = obj.settings()
    if not email and settings.mode != "solo":
        raise click.ClickException(f"--user EMAIL is required in {settings.mode} mode (only solo has an owner)")
    with opened_store(settings):
        user = user_by_email(email) if email else auth.solo_owner()
        key, plaintext = auth.create_api_key(user, name=name)
        click.echo(f"created key {key.prefix}… (id {key.id}) for {user.email or user.name}; it is shown only once:",
                   err=False)
        click.echo(plaintext)


@keys.command("revoke")
@click.argument("key")
@click.option("--user", "email", default=None, help="Only among this user's keys.")
@pass_ctx
@clean_errors
def keys_revoke(obj: Context, key: str, email: str | None) -> None:
    """Revoke a key by id, prefix (ncs_xxxxxxxx) or the whole key."""
    from . import auth

    with opened_store(obj.settings()):
        user = user_by_email(email) if email else None
        if not auth.revoke_api_key(user, key):
            raise click.ClickException(f"no active key matches {key!r}")
        click.echo(f"revoked {key}")


# ------------------------------------------------------------------------------- credits and billing

main.add_command(credits_group)  # cli_billing.py: grant, revoke, show, allowance, refund-job
main.add_command(billing_group)  # cli_billing.py: audit, settle


# ---------------------------------------------------------------------------------------- settings

@main.command("settings")
@click.option("--markdown", is_flag=True, help="Print the documentation table of every setting instead.")
@pass_ctx
@clean_errors
def settings_cmd(obj: Context, markdown: bool) -> None:
    """Print the effective settings (secrets masked)."""
    if markdown:
        click.echo(markdown_table(), nl=False)
        return
    for name, value in obj.settings().public().items():
        click.echo(f"{name} = {value!r}" if isinstance(value, str) else f"{name} = {value}")


if __name__ == "__main__":
    main()
