"""Pages that prove something before it counts: an email address (links mailed by confirmations.py) and
the first administrator (the setup link `serve` prints while there is none).

- ``/account/confirm-signup/<token>``: a hosted sign-up's link; the password it was started with creates
  the account.
- ``/account/confirm-email/<token>``: an address for the signed-in account; a button (POST) confirms it.
- ``POST /account/email/confirm``: mail a link for the account's current, unconfirmed address.
- ``/account/setup?token=...``: create the first administrator (lab and hosted).

Links open a page with a form rather than acting on GET: mail scanners fetch links, and a GET must not
change anything.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from wtforms import HiddenField, PasswordField, StringField
from wtforms.validators import EqualTo, InputRequired, Length, Optional

from .. import accounts, auth, bootstrap, confirmations, limits, mail
from ..accounts import AccountError
from ..auth import login_required
from ..errors import BadRequest, NotFound
from . import current_settings
from .account import _PASSWORD_LENGTH, ActionForm, _external

bp = Blueprint("confirm", __name__, url_prefix="/account")


class PasswordForm(FlaskForm):
    password = PasswordField("Password", validators=[InputRequired(), Length(max=accounts.PASSWORD_MAX_LENGTH)])


class SetupForm(FlaskForm):
    token = HiddenField()
    email = StringField("Email", validators=[InputRequired(), Length(max=320)])
    name = StringField("Name (optional)", validators=[Optional(), Length(max=120)])
    password = PasswordField("Password", validators=[InputRequired(), _PASSWORD_LENGTH])
    confirm = PasswordField("Password again", validators=[InputRequired(), EqualTo("password", "The passwords differ.")])


def send_link(user: Any, address: str) -> bool:
    """Mail a confirmation link for ``address`` to the signed-in ``user``, and say what happened."""
    try:
        sent = confirmations.send_email_confirmation(current_settings(), user, address, _external)
    except mail.MailError as exc:
        current_app.logger.error("confirmation mail to %s failed: %s", address, exc)
        flash("The confirmation mail could not be sent. Try again later.", "error")
        return False
    if sent:
        flash(f"We sent a link to {address}. Open it to confirm the address.", "info")
    else:
        flash("No mail server is set up: the confirmation link is in the server's log.", "info")
    return True


@bp.route("/confirm-signup/<token>", methods=["GET", "POST"])
def signup(token: str) -> Any:
    pending = confirmations.pending_signup(token)
    form = PasswordForm()
    error = None
    if pending is not None and form.validate_on_submit():
        limits.attempt_from_address()
        limits.check_account(pending["email"])
        try:
            user = confirmations.finish_signup(token, form.password.data, mode=current_settings().mode)
        except AccountError as exc:
            limits.account_failed(pending["email"])
            error = str(exc)
        else:
            if not user.is_approved:
                flash("Your email is confirmed. An administrator must approve your account before you can "
                      "sign in.", "info")
                return redirect(url_for("account.login"))
            auth.sign_in(user)
            flash("Your email is confirmed and your account is ready.", "info")
            return redirect("/")
    status = 404 if pending is None else (400 if request.method == "POST" else 200)
    return render_template("account/confirm_signup.html", form=form, pending=pending, error=error), status


@bp.route("/confirm-email/<token>", methods=["GET", "POST"])
@login_required
def email(token: str) -> Any:
    user = current_user._get_current_object()
    settings = current_settings()
    form = ActionForm()
    try:
        address = confirmations.read_email_token(settings, token, user)
    except AccountError as exc:
        return render_template("account/confirm_email.html", error=str(exc), address=None, form=form), 400
    if request.method == "POST":
        if not form.validate_on_submit():
            raise BadRequest("This form expired or was not sent from this site. Reload the page and try again.")
        try:
            confirmations.confirm_email(settings, token, user)
        except AccountError as exc:
            return render_template("account/confirm_email.html", error=str(exc), address=address, form=form), 400
        flash(f"{address} is confirmed as your email.", "info")
        return redirect(url_for("account.profile"))
    return render_template("account/confirm_email.html", error=None, address=address, form=form)


@bp.post("/email/confirm")
@login_required
def resend() -> Any:
    if not ActionForm().validate_on_submit():
        raise BadRequest("This form expired or was not sent from this site. Reload the page and try again.")
    limits.attempt_from_address()
    user = current_user._get_current_object()
    if not user.email:
        flash("Set an email address first.", "error")
    elif accounts.email_verified(user):
        flash(f"{user.email} is confirmed already.", "info")
    else:
        send_link(user, user.email)
    return redirect(url_for("account.profile"))


@bp.route("/setup", methods=["GET", "POST"])
def setup() -> Any:
    if current_settings().mode == "solo":
        raise NotFound("Solo mode has no setup: its owner is this machine's user.")
    form = SetupForm()
    if request.method == "GET":
        form.token.data = request.args.get("token", "")
    if not bootstrap.setup_token_valid(form.token.data):
        return render_template("account/setup.html", form=None), 404
    error = None
    if form.validate_on_submit():
        limits.attempt_from_address()
        try:
            user = bootstrap.create_first_admin(form.token.data, form.email.data, form.password.data,
                                               form.name.data or "")
        except AccountError as exc:
            error = str(exc)
        else:
            auth.sign_in(user)
            flash("You are this studio's administrator. Confirm your email from your profile.", "info")
            return redirect(url_for("account.profile"))
    status = 400 if request.method == "POST" else 200
    return render_template("account/setup.html", form=form, error=error), status
