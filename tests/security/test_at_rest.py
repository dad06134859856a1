"""Secrets and files at rest (issue 10, point 9): S3 credentials given with a dataset are sealed with a
key derived from the secret key and dropped once no job needs them; the data directory is 0700 and its
files 0600. Through the real ``serve`` where it matters (it is what creates the files).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest
import requests

from harness import Studio, open_store, persona, wait_for
from nanochat_studio import auth, datasets, jobs, secretbox
from nanochat_studio.models import TrainingJob

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
SPEC = {"source": "s3://training-data/corpus", "credentials": {"key": "AKIAIOSFODNN7EXAMPLE", "secret": SECRET}}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_serve_keeps_the_data_directory_private(tmp_path, store_url):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    (home / "notes.txt").write_text("an older install's file, world-readable")
    os.chmod(home / "notes.txt", 0o644)
    db_url = f"sqlite:///{home}/studio.db" if store_url.startswith("sqlite") else store_url
    studio = Studio(home, db_url, mode="lab", env={"NCS_WORKER": "true"})
    try:
        wait_for(lambda: (home / "queue.db").exists(), timeout=30)
        requests.get(studio.url + "/healthz", timeout=30)
        assert mode_of(home) == 0o700
        files = [p for p in home.iterdir() if p.is_file()]
        assert {"secret_key", "queue.db", "notes.txt"} <= {p.name for p in files}
        if store_url.startswith("sqlite"):
            assert {"studio.db"} <= {p.name for p in files}
        for path in files:
            assert mode_of(path) == 0o600, (path.name, oct(mode_of(path)))
        for path in home.iterdir():
            if path.is_dir():
                assert mode_of(path) == 0o700, path.name
    finally:
        studio.stop()
    studio.assert_no_tracebacks()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, store_url):
    studio = Studio(tmp_path_factory.mktemp("at-rest") / "home", store_url, mode="lab")
    yield studio
    studio.stop()
    studio.assert_no_tracebacks()


def test_s3_credentials_are_sealed_in_the_store_and_gone_when_the_job_ends(lab, store_url):
    open_store(store_url)
    alice = persona("alice")
    _, key = auth.create_api_key(alice)
    bearer = {"Authorization": f"Bearer {key}"}
    r = requests.post(lab.url + "/api/jobs", json={"depth": 1, "dataset": SPEC}, headers=bearer, timeout=30)
    assert r.status_code == 201, r.text
    assert SECRET not in r.text and r.json()["config"]["dataset"] == "s3://training-data/corpus"
    job = TrainingJob.get_by_id(r.json()["id"])
    stored = job.config["dataset"]
    assert SECRET not in repr(job.config) and "credentials" not in stored and stored["sealed_credentials"]
    if store_url.startswith("sqlite"):  # not in any byte of the database files either (the WAL included)
        path = Path(store_url.removeprefix("sqlite:///"))
        for file in path.parent.glob(path.name + "*"):
            assert SECRET.encode() not in file.read_bytes(), file

    r = requests.post(f"{lab.url}/api/jobs/{job.id}/cancel", headers=bearer, timeout=30)
    assert r.status_code == 200
    after = TrainingJob.get_by_id(job.id).config["dataset"]
    assert after == {"kind": "s3", "source": "s3://training-data/corpus"}


def test_a_sealed_spec_opens_for_the_trainer_and_not_under_another_secret_key(make_settings):
    from nanochat_studio.app import create_app

    settings = make_settings(mode="lab")
    create_app(settings)  # the store, migrated
    alice = persona("alice")
    job = jobs.submit(alice, {"depth": 1, "dataset": SPEC}, settings)
    data, options = datasets.resolve_for_training(job, settings)
    assert data == "s3://training-data/corpus"
    assert (options["key"], options["secret"], options["anon"]) == ("AKIAIOSFODNN7EXAMPLE", SECRET, False)

    rotated = dataclasses.replace(settings, secret_key="a different secret key, long enough")
    with pytest.raises(datasets.DatasetError, match="secret key"):
        datasets.resolve_for_training(job, rotated)
    with pytest.raises(secretbox.SealError):
        secretbox.unseal(job.config["dataset"]["sealed_credentials"] + "x", settings)


def test_every_final_state_drops_the_credentials(make_settings):
    from nanochat_studio.app import create_app

    settings = make_settings(mode="lab")
    create_app(settings)
    bob = persona("bob")
    for final in (jobs.FAILED, jobs.CANCELLED):
        job = jobs.submit(bob, {"depth": 1, "dataset": SPEC}, settings)
        assert jobs.transition(job.id, final, expect={jobs.QUEUED}, reason="test")
        assert "sealed_credentials" not in TrainingJob.get_by_id(job.id).config["dataset"]
    job = jobs.submit(bob, {"depth": 1, "dataset": SPEC}, settings)
    assert jobs.transition(job.id, jobs.PREPARING, expect={jobs.QUEUED}, reason="claimed")
    assert jobs.transition(job.id, jobs.INTERRUPTED, expect={jobs.PREPARING}, reason="worker died")
    assert TrainingJob.get_by_id(job.id).config["dataset"]["sealed_credentials"]  # a retry still needs them
