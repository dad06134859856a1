"""Settings: defaults, environment, TOML, precedence, *_FILE secrets, errors that name the setting, the
generated secret key, and a documentation check that fails when a setting is undocumented."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from nanochat_studio.settings import Settings, SettingsError, env_name, load_settings, markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"


def load(tmp_path: Path, env: dict | None = None, **overrides):
    return load_settings(environ={"NCS_HOME": str(tmp_path / "home"), **(env or {})}, **overrides)


def test_defaults_are_safe_and_live_in_home(tmp_path):
    s = load(tmp_path)
    home = tmp_path / "home"
    assert (s.mode, s.host, s.port) == ("solo", "127.0.0.1", 8765)
    assert s.home == str(home.resolve())
    assert s.database_url == f"sqlite:///{home.resolve()}/studio.db"
    assert s.queue_url == f"sqlite:///{home.resolve()}/queue.db"
    assert s.storage_url == f"file://{home.resolve()}/storage"
    assert s.runs_dir == str(home.resolve() / "runs")
    assert s.worker is True and s.allow_private_urls is False and s.storage_options == {}
    assert s.upload_max_bytes == 2 << 30 and s.user_quota_bytes == 20 << 30
    assert s.allow_server_paths is True  # solo


def test_home_defaults_to_the_platform_user_data_dir(monkeypatch, tmp_path):
    import platformdirs

    monkeypatch.setattr(platformdirs, "user_data_dir", lambda name: str(tmp_path / "platform" / name))
    s = load_settings(environ={})
    assert s.home == str((tmp_path / "platform" / "nanochat-studio").resolve())


def test_settings_are_frozen(tmp_path):
    s = load(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]


def test_environment_values_are_parsed_by_type(tmp_path):
    s = load(tmp_path, {"NCS_PORT": "9000", "NCS_WORKER": "no", "NCS_LEASE_SECONDS": "12.5",
                        "NCS_STORAGE_OPTIONS": '{"endpoint_url": "http://127.0.0.1:9"}', "NCS_MODE": "LAB",
                        "NCS_URL_TIMEOUT": "30", "NCS_GPUS": "0, 1"})
    assert (s.port, s.worker, s.lease_seconds, s.mode) == (9000, False, 12.5, "lab")
    assert s.storage_options == {"endpoint_url": "http://127.0.0.1:9"}
    assert s.url_timeout_s == 30.0 and s.gpus == "0,1"
    assert s.allow_server_paths is False  # not solo: admins only


def test_precedence_is_flags_then_environment_then_toml_then_defaults(tmp_path):
    toml = tmp_path / "studio.toml"
    toml.write_text('port = 7000\nthreads = 48\nmode = "lab"\nstorage_options = {key = "k"}\n')
    env = {"NCS_CONFIG": str(toml), "NCS_PORT": "7100"}
    s = load(tmp_path, env)
    assert (s.port, s.threads, s.mode, s.storage_options) == (7100, 48, "lab", {"key": "k"})
    s = load(tmp_path, env, port=7200, mode=None)  # None: a flag not given
    assert (s.port, s.mode) == (7200, "lab")
    assert load(tmp_path, toml_path=toml).port == 7000


def test_secrets_can_come_from_files(tmp_path):
    secret = tmp_path / "gh_secret"
    secret.write_text("s3cr3t-from-a-file\n")
    key = tmp_path / "key"
    key.write_text("k" * 40)
    s = load(tmp_path, {"NCS_GITHUB_CLIENT_SECRET_FILE": str(secret), "NCS_SECRET_KEY_FILE": str(key)})
    assert s.github_client_secret == "s3cr3t-from-a-file"
    assert s.secret_key == "k" * 40
    assert not (tmp_path / "home" / "secret_key").exists()


def test_a_missing_secret_file_names_the_variable(tmp_path):
    with pytest.raises(SettingsError, match="^NCS_GOOGLE_CLIENT_SECRET_FILE: cannot read"):
        load(tmp_path, {"NCS_GOOGLE_CLIENT_SECRET_FILE": str(tmp_path / "nope")})


@pytest.mark.parametrize("env, name", [
    ({"NCS_PORT": "abc"}, "NCS_PORT"),
    ({"NCS_PORT": "70000"}, "NCS_PORT"),
    ({"NCS_MODE": "party"}, "NCS_MODE"),
    ({"NCS_WORKER": "maybe"}, "NCS_WORKER"),
    ({"NCS_THREADS": "-1"}, "NCS_THREADS"),
    ({"NCS_THREADS": "20"}, "NCS_THREADS"),  # below max_streams (32) + 4: streams could take them all
    ({"NCS_TRUSTED_PROXY": "127.0.0.1"}, "NCS_TRUSTED_PROXY"),  # solo mode behind a proxy
    ({"NCS_LOGIN_LIMIT_PER_ACCOUNT": "lots"}, "NCS_LOGIN_LIMIT_PER_ACCOUNT"),
    ({"NCS_API_RATE_LIMIT": "10 per fortnight"}, "NCS_API_RATE_LIMIT"),
    ({"NCS_SMTP_URL": "http://mail.example.org"}, "NCS_SMTP_URL"),
    ({"NCS_SERVER_PATH_ROOTS": "data"}, "NCS_SERVER_PATH_ROOTS"),
    ({"NCS_STORAGE_OPTIONS": "[1, 2]"}, "NCS_STORAGE_OPTIONS"),
    ({"NCS_DATABASE_URL": "mysql://x/y"}, "NCS_DATABASE_URL"),
    ({"NCS_QUEUE_URL": "amqp://x"}, "NCS_QUEUE_URL"),
    ({"NCS_BASE_URL": "studio.example.org"}, "NCS_BASE_URL"),
    ({"NCS_GPUS": "first"}, "NCS_GPUS"),
    ({"NCS_SECRET_KEY": "short"}, "NCS_SECRET_KEY"),
    ({"NCS_LOG_LEVEL": "loud"}, "NCS_LOG_LEVEL"),
])
def test_a_bad_value_stops_the_start_naming_the_setting(tmp_path, env, name):
    with pytest.raises(SettingsError) as info:
        load(tmp_path, env)
    assert str(info.value).startswith(name + ":")


def test_toml_errors_name_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("port = \n")
    with pytest.raises(SettingsError, match="NCS_CONFIG: .* is not valid TOML"):
        load(tmp_path, {"NCS_CONFIG": str(bad)})
    typo = tmp_path / "typo.toml"
    typo.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting.*prot"):
        load(tmp_path, {"NCS_CONFIG": str(typo)})
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('port = "eighty"\n')
    with pytest.raises(SettingsError, match=r"^NCS_PORT: expected an integer .*wrong\.toml"):
        load(tmp_path, {"NCS_CONFIG": str(wrong)})


def test_threads_are_sized_from_the_stream_caps(tmp_path):
    s = load(tmp_path)
    assert s.threads == s.max_streams + 8
    s = load(tmp_path, {"NCS_MAX_STREAMS": "4"})
    assert s.threads == 12
    assert load(tmp_path, {"NCS_MAX_STREAMS": "4", "NCS_THREADS": "8"}).threads == 8  # 4 left over: allowed


def test_a_trusted_proxy_is_for_lab_and_hosted(tmp_path):
    assert load(tmp_path, {"NCS_MODE": "lab", "NCS_TRUSTED_PROXY": "10.0.0.2"}).trusted_proxy == "10.0.0.2"
    with pytest.raises(SettingsError, match="use lab mode"):
        load(tmp_path, {"NCS_TRUSTED_PROXY": "10.0.0.2"})


def test_the_secret_key_is_generated_once_private_and_reused(tmp_path):
    first = load(tmp_path).secret_key
    path = tmp_path / "home" / "secret_key"
    assert len(first) >= 32 and first != "dev"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load(tmp_path).secret_key == first
    other_home = load_settings(environ={"NCS_HOME": str(tmp_path / "elsewhere")}).secret_key
    assert other_home != first


def test_public_view_masks_secrets_but_not_the_rest(tmp_path):
    s = load(tmp_path, {"NCS_DATABASE_URL": "postgresql://ncs:hunter2hunter2@db:5432/ncs",
                        "NCS_GITHUB_CLIENT_SECRET": "gh-secret", "NCS_STORAGE_OPTIONS": '{"secret": "x", "region": "r"}'})
    shown = s.public()
    assert shown["secret_key"] == "***" and shown["github_client_secret"] == "***"
    assert shown["database_url"] == "postgresql://ncs:***@db:5432/ncs"
    assert shown["storage_options"] == {"secret": "***", "region": "r"}
    assert shown["port"] == 8765


def test_every_setting_is_documented_here_and_in_the_readme():
    readme = README.read_text(encoding="utf-8")
    for f in dataclasses.fields(Settings):
        assert len(f.metadata.get("doc", "")) > 10, f"setting {f.name} has no documentation"
        assert env_name(f).startswith("NCS_")
        assert f"| `{f.name}` |" in readme, f"setting {f.name} is missing from README.md's configuration table"
    assert markdown_table() in readme, "README's table is stale: paste `nanochat-studio settings --markdown`"
