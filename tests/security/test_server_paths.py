"""Server-path datasets never read the studio's own files or secrets (issue 10, point 12: an admin could
train on the app's secret_key). Probed as an administrator of a lab, through the real ``serve``.
"""

from __future__ import annotations

import os

import pytest
import requests

from harness import Studio, open_store, persona
from nanochat_studio import auth

TEXT = "It was the best of times, it was the worst of times.\n" * 20


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    data = root / "data"
    data.mkdir()
    (data / "corpus.txt").write_text(TEXT)
    secrets = root / "secrets"
    secrets.mkdir()
    (secrets / "github_secret").write_text("gh-client-secret")
    return {"root": root, "home": root / "home", "data": data, "secrets": secrets}


@pytest.fixture(scope="module")
def lab(places, store_url):
    studio = Studio(places["home"], store_url, mode="lab",
                    env={"NCS_GITHUB_CLIENT_SECRET_FILE": str(places["secrets"] / "github_secret")})
    yield studio
    studio.stop()
    studio.assert_no_tracebacks()


@pytest.fixture
def admin(lab, store_url):
    open_store(store_url)
    root = persona("root", admin=True)
    _, key = auth.create_api_key(root)
    return {"Authorization": f"Bearer {key}"}


def submit(studio: Studio, key: dict, dataset: str) -> requests.Response:
    return requests.post(studio.url + "/api/jobs", json={"depth": 1, "dataset": dataset}, headers=key, timeout=30)


def test_a_path_outside_the_studio_is_accepted(lab, admin, places):
    assert submit(lab, admin, str(places["data"] / "corpus.txt")).status_code == 201
    assert submit(lab, admin, str(places["data"])).status_code == 201


def test_members_cannot_use_server_paths_at_all(lab, admin, places):
    persona("alice")
    _, key = auth.create_api_key(persona("alice"))
    r = submit(lab, {"Authorization": f"Bearer {key}"}, str(places["data"] / "corpus.txt"))
    assert r.status_code == 403 and "admins" in r.json()["error"]["message"]


@pytest.mark.parametrize("target", [
    "home/secret_key", "home", "home/studio.db", "home/storage", "home/runs/1/job.json", "home/../home/secret_key",
    "secrets/github_secret", ".", "/etc/passwd", "/proc/self/environ", "/run/secrets/db", "/dev/zero",
])
def test_the_studios_files_secrets_and_system_files_are_refused(lab, admin, places, target):
    path = target if target.startswith("/") else str(places["root"] / target)
    r = submit(lab, admin, path)
    assert r.status_code == 403, (path, r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert "cannot be a dataset" in message and "gh-client-secret" not in message


def test_links_into_the_studio_are_followed_and_refused(lab, admin, places, tmp_path):
    link = tmp_path / "innocent.txt"
    link.symlink_to(places["home"] / "secret_key")
    assert submit(lab, admin, str(link)).status_code == 403
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.txt").symlink_to(places["home"] / "secret_key")
    r = submit(lab, admin, str(folder))
    assert r.status_code == 403 and "links to a place that is refused" in r.json()["error"]["message"]
    (folder / "b.txt").unlink()
    (folder / "sub").symlink_to(places["home"])
    assert submit(lab, admin, str(folder)).status_code == 403


def test_hidden_files_and_directories_are_refused(lab, admin, tmp_path):
    hidden = tmp_path / ".ssh"
    hidden.mkdir()
    (hidden / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert submit(lab, admin, str(hidden / "id_ed25519")).status_code == 403


def test_server_path_roots_confine_server_paths(places, tmp_path, store_url):
    open_store(store_url)
    _, key = auth.create_api_key(persona("root", admin=True))
    admin = {"Authorization": f"Bearer {key}"}
    outside = tmp_path / "elsewhere.txt"
    outside.write_text(TEXT)
    studio = Studio(tmp_path / "home", store_url, mode="lab", env={"NCS_SERVER_PATH_ROOTS": str(places["data"])})
    try:
        assert submit(studio, admin, str(places["data"] / "corpus.txt")).status_code == 201
        r = submit(studio, admin, str(outside))
        assert r.status_code == 403 and "server_path_roots" in r.json()["error"]["message"]
    finally:
        studio.stop()
    studio.assert_no_tracebacks()
    assert os.path.exists(outside)
