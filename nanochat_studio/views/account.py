"""Account pages: sign in and out, sign up, GitHub/Google sign-in, profile with API keys, admin's user list.

The rules live in ``accounts.py`` and ``auth.py``; these views turn forms into calls and
``AccountError`` into form errors.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, logout_user
from flask_wtf import FlaskForm
from requests import RequestException
from wtforms import HiddenField, PasswordField, StringField
from wtforms.validators import EqualTo, InputRequired, Length, Optional

from .. import accounts, auth, confirmations, limits, mail
from ..accounts import AccountError, HashingBusy
from ..auth import admin_required, login_required
from ..errors import BadRequest, NotFound, TooManyRequests
from ..models import ApiKey, User
from . import current_settings

bp = Blueprint("account", __name__, url_prefix="/account")

_DIFFER = "The passwords differ."
_PASSWORD_LENGTH = Length(
    min=accounts.PASSWORD_MIN_LENGTH,
    max=accounts.PASSWORD_MAX_LENGTH,
    message=f"Use {accounts.PASSWORD_MIN_LENGTH} to {accounts.PASSWORD_MAX_LENGTH} characters.",
)


class LoginForm(FlaskForm):
    email = StringField("Email", validators=[InputRequired(), Length(max=320)])
    password = PasswordField("Password", validators=[InputRequired(), Length(max=accounts.PASSWORD_MAX_LENGTH)])
    next = HiddenField()


class RegisterForm(FlaskForm):
    email = StringField("Email", validators=[InputRequired(), Length(max=320)])
    name = StringField("Name (optional)", validators=[Optional(), Length(max=120)])
    password = PasswordField("Password", validators=[InputRequired(), _PASSWORD_LENGTH])
    confirm = PasswordField("Password again", validators=[InputRequired(), EqualTo("password", _DIFFER)])
    invite = HiddenField()
    next = HiddenField()


class ProfileForm(FlaskForm):
    email = StringField("Email", validators=[Optional(), Length(max=320)])
    name = StringField("Name", validators=[Optional(), Length(max=120)])
    current_password = PasswordField("Current password", validators=[Optional()])
    new_password = PasswordField("New password", validators=[Optional(), _PASSWORD_LENGTH])
    confirm = PasswordField("New password again", validators=[EqualTo("new_password", _DIFFER)])


class KeyForm(FlaskForm):
    """Prefixed ("key-name"): it shares the profile page with ProfileForm, and HTML ids must be unique."""

    name = StringField("Key name", validators=[Optional(), Length(max=120)])


class ActionForm(FlaskForm):
    """A button: nothing but the CSRF token."""


def _mode() -> str:
    return current_settings().mode


def _require_form(form: FlaskForm) -> None:
    if not form.validate_on_submit():
        raise BadRequest("This form expired or was not sent from this site. Reload the page and try again.")


def _home() -> str:
    return "/"


def _external(endpoint: str, **values: Any) -> str:
    """An absolute URL: from ``base_url`` when set (behind a proxy), else from the request."""
    base = current_settings().base_url
    if base:
        return base.rstrip("/") + url_for(endpoint, **values)
    return url_for(endpoint, _external=True, **values)


# ---------------------------------------------------------------------------------- sign in, out

@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    form = LoginForm()
    if request.method == "GET":
        form.next.data = request.args.get("next", "")
    target = auth.safe_next(form.next.data) or _home()
    if current_user.is_authenticated:
        return redirect(target)
    error = None
    if form.validate_on_submit():
        limits.attempt_from_address()  # 429 past the address's attempts
        limits.check_account(form.email.data)  # 429 once the account's failed attempts are used up
        try:
            user = accounts.authenticate(form.email.data, form.password.data)
            auth.sign_in(user)
            return redirect(target)
        except HashingBusy as exc:
            raise TooManyRequests(str(exc), headers={"Retry-After": "2"}) from None
        except AccountError as exc:
            limits.account_failed(form.email.data)
            current_app.logger.info("sign-in refused for %r from %s: %s", form.email.data[:320],
                                    limits.client_address(), exc)
            error = str(exc)
    status = 400 if request.method == "POST" else 200
    return render_template("account/login.html", form=form, error=error, next=form.next.data), status


@bp.post("/logout")
def logout() -> Any:
    # Ends every session of the account, not only this browser's: a copy of this cookie (taken before
    # the logout) must stop working too, and the session version is per account.
    _require_form(ActionForm())
    if current_user.is_authenticated and auth.bearer_token() is None:
        auth.sign_out_everywhere(current_user._get_current_object())
    else:
        logout_user()
    flash("You are signed out.", "info")
    return redirect(url_for("account.login"))


@bp.post("/sessions/end")
@login_required
def end_sessions() -> Any:
    """Sign out everywhere: every browser signed in to this account, this one included."""
    _require_form(ActionForm())
    auth.sign_out_everywhere(current_user._get_current_object())
    flash("You are signed out everywhere. Sign in again here.", "info")
    return redirect(url_for("account.login"))


@bp.route("/register", methods=["GET", "POST"])
def register() -> Any:
    mode = _mode()
    if mode == "solo":
        flash("Sign-up is closed: this studio runs in solo mode for its owner.", "info")
        return redirect(url_for("account.login"))
    form = RegisterForm()
    if request.method == "GET":
        form.invite.data = request.args.get("invite", "")
        form.next.data = request.args.get("next", "")
    error = None
    if form.validate_on_submit():
        limits.attempt_from_address()
        try:
            if mode == "hosted":  # nothing is created until the link mailed to the address is opened
                return _start_signup(form)
            user = accounts.register_user(
                form.email.data, form.password.data, form.name.data or "", mode=mode, invite=form.invite.data or None
            )
        except HashingBusy as exc:
            raise TooManyRequests(str(exc), headers={"Retry-After": "2"}) from None
        except AccountError as exc:
            error = str(exc)
        else:
            _mail_confirmation(user)
            if not user.is_approved:
                flash("Thanks! An administrator must approve your account before you can sign in.", "info")
                return redirect(url_for("account.login"))
            auth.sign_in(user)
            flash("Welcome! Your account is ready.", "info")
            return redirect(auth.safe_next(form.next.data) or _home())
    status = 400 if request.method == "POST" else 200
    return render_template("account/register.html", form=form, error=error), status


def _start_signup(form: RegisterForm) -> Any:
    settings = current_settings()
    try:
        confirmations.start_signup(settings, form.email.data, form.password.data, form.name.data or "",
                                   form.invite.data or None, _external)
    except mail.MailError as exc:
        current_app.logger.error("sign-up mail failed: %s", exc)
        raise AccountError("The confirmation mail could not be sent. Try again later.") from None
    hours = f"{settings.email_link_hours:g} hours"
    return render_template("account/check_email.html", address=accounts.normalize_email(form.email.data),
                           hours=hours, mail_configured=mail.configured(settings))


def _mail_confirmation(user: User) -> None:
    """A lab sign-up's address gets a link too (it must be confirmed before GitHub or Google can join
    this account by it); a failure to send is logged, not shown: the account exists either way."""
    if not user.email:
        return
    try:
        confirmations.send_email_confirmation(current_settings(), user, user.email, _external)
    except (mail.MailError, AccountError) as exc:
        current_app.logger.error("confirmation mail to %s failed: %s", user.email, exc)


# ----------------------------------------------------------------------------- GitHub and Google

@bp.get("/oauth/<provider>/login")
def oauth_login(provider: str) -> Any:
    client = auth.oauth_client(provider)
    if client is None:
        raise NotFound("This sign-in method is not enabled.")
    session["oauth_next"] = auth.safe_next(request.args.get("next")) or ""
    session["oauth_invite"] = request.args.get("invite", "")[:100]
    session.pop("oauth_link_user", None)
    return _to_provider(provider, client)


@bp.post("/oauth/<provider>/link")
@login_required
def oauth_link(provider: str) -> Any:
    # A POST with CSRF, so no other site can start linking someone else's provider account to this one.
    _require_form(ActionForm())
    client = auth.oauth_client(provider)
    if client is None:
        raise NotFound("This sign-in method is not enabled.")
    session["oauth_link_user"] = current_user.id
    session["oauth_next"] = url_for("account.profile")
    return _to_provider(provider, client)


def _to_provider(provider: str, client: Any) -> Any:
    try:  # Google's first sign-in fetches its discovery document: the provider may be unreachable
        return client.authorize_redirect(_external("account.oauth_callback", provider=provider))
    except RequestException as exc:
        current_app.logger.warning("%s sign-in unavailable: %r", provider, exc)
        flash(f"{accounts.PROVIDER_LABELS[provider]} sign-in is unavailable right now. Try again later.", "error")
        return redirect(url_for("account.login"))


@bp.get("/oauth/<provider>/callback")
def oauth_callback(provider: str) -> Any:
    client = auth.oauth_client(provider)
    if client is None:
        raise NotFound("This sign-in method is not enabled.")
    target = auth.safe_next(session.pop("oauth_next", None)) or _home()
    invite = session.pop("oauth_invite", None) or None
    link_user_id = session.pop("oauth_link_user", None)
    linking = None
    if link_user_id is not None and current_user.is_authenticated and current_user.id == link_user_id:
        linking = current_user._get_current_object()
    try:
        identity = auth.fetch_identity(provider, client)
        user = accounts.sign_in_identity(identity, mode=_mode(), linking=linking, invite=invite)
    except AccountError as exc:
        flash(str(exc), "error")
        return redirect(url_for("account.profile" if linking else "account.login"))
    label = accounts.PROVIDER_LABELS[provider]
    if linking is not None:
        flash(f"{label} is now linked to your account.", "info")
        return redirect(url_for("account.profile"))
    auth.sign_in(user)
    return redirect(target)


# --------------------------------------------------------------------------------------- profile

def _render_profile(new_key: str | None = None, key_form: KeyForm | None = None,
                    profile_form: ProfileForm | None = None, error: str | None = None, status: int = 200) -> Any:
    user = current_user._get_current_object()
    keys = ApiKey.select().where(ApiKey.user == user).order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
    if profile_form is None:
        profile_form = ProfileForm(formdata=None, obj=user)
    body = render_template(
        "account/profile.html",
        user=user,
        keys=list(keys),
        new_key=new_key,
        key_form=key_form or KeyForm(formdata=None, prefix="key"),
        profile_form=profile_form,
        action_form=ActionForm(formdata=None),
        error=error,
        provider_label=accounts.PROVIDER_LABELS.get(user.oauth_provider or "", user.oauth_provider),
        providers=auth.enabled_providers(),
    )
    headers = {"Cache-Control": "no-store"} if new_key else {}
    return body, status, headers


@bp.get("/profile")
@login_required
def profile() -> Any:
    return _render_profile()


@bp.post("/profile")
@login_required
def update_profile() -> Any:
    form = ProfileForm()
    if not form.validate_on_submit():
        return _render_profile(profile_form=form, status=400)
    user = current_user._get_current_object()
    new_email = None
    if form.new_password.data or (form.email.data and form.email.data.strip().lower() != (user.email or "")):
        limits.attempt_from_address()  # a password check or a mail: counted before anything changes
    try:
        if form.email.data and form.email.data.strip().lower() != (user.email or ""):
            # The address becomes the account's only when the link mailed to it is opened.
            new_email = accounts.check_email_free(form.email.data, user)
        if form.new_password.data:
            accounts.set_password(user, form.new_password.data, form.current_password.data)
            auth.stamp_session(user)  # every other session ended; this one goes on
            confirmations.notify_password_changed(current_settings(), user)
    except HashingBusy as exc:
        raise TooManyRequests(str(exc), headers={"Retry-After": "2"}) from None
    except AccountError as exc:
        return _render_profile(profile_form=form, error=str(exc), status=400)
    name = (form.name.data or "").strip()
    if name != user.name:
        User.update(name=name).where(User.id == user.id).execute()
    flash("Your profile is saved." + (" Other browsers signed in to it are signed out." if form.new_password.data
                                      else ""), "info")
    if new_email:
        from .confirm import send_link

        send_link(user, new_email)
    return redirect(url_for("account.profile"))


@bp.post("/keys")
@login_required
def create_key() -> Any:
    form = KeyForm(prefix="key")
    _require_form(form)
    _, secret = auth.create_api_key(current_user._get_current_object(), form.name.data or "")
    # Rendered into this response, never flashed: a flash would put the key in the session cookie.
    return _render_profile(new_key=secret, status=201)


@bp.post("/keys/<int:key_id>/revoke")
@login_required
def revoke_key(key_id: int) -> Any:
    _require_form(ActionForm())
    if auth.revoke_api_key(current_user._get_current_object(), str(key_id)):
        flash("The key is revoked; programs using it are refused from now on.", "info")
    else:
        flash("No such active key.", "error")
    return redirect(url_for("account.profile"))


# ----------------------------------------------------------------------------------------- admin

def _render_admin(invite_link: str | None = None, status: int = 200) -> Any:
    users = User.select().order_by(User.is_approved, User.created_at, User.id)
    body = render_template(
        "account/admin_users.html", users=list(users), action_form=ActionForm(formdata=None), invite_link=invite_link
    )
    return body, status, ({"Cache-Control": "no-store"} if invite_link else {})


@bp.get("/admin/users")
@admin_required
def admin_users() -> Any:
    return _render_admin()


def _user_or_404(user_id: int) -> User:
    user = User.get_or_none(User.id == user_id)
    if user is None:
        raise NotFound("No such user.")
    return user


@bp.post("/admin/users/<int:user_id>/approve")
@admin_required
def approve_user(user_id: int) -> Any:
    _require_form(ActionForm())
    user = _user_or_404(user_id)
    User.update(is_approved=True).where(User.id == user.id).execute()
    flash(f"{user.email or user.name} can sign in now.", "info")
    return redirect(url_for("account.admin_users"))


@bp.post("/admin/users/<int:user_id>/promote")
@admin_required
def promote_user(user_id: int) -> Any:
    _require_form(ActionForm())
    user = _user_or_404(user_id)
    User.update(is_admin=True, is_approved=True).where(User.id == user.id).execute()
    flash(f"{user.email or user.name} is an administrator now.", "info")
    return redirect(url_for("account.admin_users"))


@bp.post("/admin/users/<int:user_id>/disable")
@admin_required
def disable_user(user_id: int) -> Any:
    _require_form(ActionForm())
    user = _user_or_404(user_id)
    if user.id == current_user.id:
        flash("You cannot disable your own account.", "error")
    else:
        accounts.set_active(user, False)
        flash(f"{user.email or user.name} is disabled: signed out everywhere, API keys refused.", "info")
    return redirect(url_for("account.admin_users"))


@bp.post("/admin/users/<int:user_id>/enable")
@admin_required
def enable_user(user_id: int) -> Any:
    _require_form(ActionForm())
    user = _user_or_404(user_id)
    accounts.set_active(user, True)
    flash(f"{user.email or user.name} can sign in again.", "info")
    return redirect(url_for("account.admin_users"))


@bp.post("/admin/invites")
@admin_required
def create_invite() -> Any:
    _require_form(ActionForm())
    token = accounts.create_invite(current_user._get_current_object())
    return _render_admin(invite_link=_external("account.register", invite=token), status=201)
