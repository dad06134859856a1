"""Decompression bombs (issue 10, point 7): a 570 KB .txt.gz that expanded to 196 MB passed the quota,
which counted compressed bytes. Now gzip counts as what it expands to, the expansion is capped
(``expanded_max_bytes``), and reading stops at the cap with a clear error; nothing is kept.
"""

from __future__ import annotations

import gzip
import http.server
import ssl
import threading
from pathlib import Path

import pytest
import requests

from harness import Studio, open_store, persona
from nanochat_studio import auth, datasets, estimate
from nanochat_studio.models import Dataset, TrainingJob
from tests.test_fetch import seam, tls_files  # noqa: F401  (fixture: a CA and a certificate for public.test)

QUOTA, EXPANDED_MAX = 30_000_000, 20_000_000
LINE = b"All work and no play makes a small model a dull model.\n"


def gz(n_bytes: int, unit: bytes = b"\0") -> bytes:
    return gzip.compress(unit * n_bytes, compresslevel=9)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, store_url):
    studio = Studio(tmp_path_factory.mktemp("bombs") / "home", store_url, mode="lab",
                    env={"NCS_USER_QUOTA_BYTES": str(QUOTA), "NCS_EXPANDED_MAX_BYTES": str(EXPANDED_MAX)})
    yield studio
    studio.stop()
    studio.assert_no_tracebacks()


def upload(studio: Studio, key: dict, name: str, data: bytes) -> requests.Response:
    return requests.post(studio.url + "/api/datasets", headers=key, files={"file": (name, data)}, timeout=120)


def stored_files(studio: Studio) -> list[Path]:
    return [p for p in (studio.home / "storage").rglob("*") if p.is_file()]


def test_a_gzip_bomb_stops_at_the_cap_and_leaves_nothing(lab, store_url):
    open_store(store_url)
    alice = persona("alice")
    _, secret = auth.create_api_key(alice)
    key = {"Authorization": f"Bearer {secret}"}
    bomb = gz(200_000_000)  # ~200 KB that expands to 200 MB: far under the quota as sent
    assert len(bomb) < 300_000
    r = upload(lab, key, "bomb.txt.gz", bomb)
    assert r.status_code == 413
    message = r.json()["error"]["message"]
    assert "expands to more than 20,000,000 bytes" in message and "expanded_max_bytes" in message
    assert not Dataset.select().where(Dataset.user == alice).exists()
    assert stored_files(lab) == []


def test_gzip_counts_against_the_quota_as_it_expands(lab, store_url):
    open_store(store_url)
    bob = persona("bob")
    _, secret = auth.create_api_key(bob)
    key = {"Authorization": f"Bearer {secret}"}
    first = upload(lab, key, "a.txt.gz", gz(18_000_000 // len(LINE), LINE))
    assert first.status_code == 201, first.text
    ds = Dataset.get_by_id(first.json()["id"])
    assert ds.size_bytes < 200_000 and ds.expanded_bytes == 18_000_000 // len(LINE) * len(LINE)
    assert datasets.used_bytes(bob) == ds.expanded_bytes
    assert estimate.data_bytes(f"ds:{ds.id}", bob) == ds.expanded_bytes  # estimates see the text, too

    # 18 MB used of 30: another 15 MB of text fits as sent (~100 KB) but not as it expands.
    second = upload(lab, key, "b.txt.gz", gz(15_000_000 // len(LINE), LINE))
    assert second.status_code == 413
    assert "quota" in second.json()["error"]["message"]
    assert Dataset.select().where(Dataset.user == bob).count() == 1


def test_a_broken_gzip_upload_is_refused_with_the_reason(lab, store_url):
    open_store(store_url)
    _, secret = auth.create_api_key(persona("carol"))
    key = {"Authorization": f"Bearer {secret}"}
    cut = gz(20_000, LINE)[:-50]  # 1.1 MB of text, its end cut off
    r = upload(lab, key, "cut.txt.gz", cut)
    assert r.status_code == 400 and "gzip" in r.json()["error"]["message"], r.text


# --- a dataset fetched from a URL --------------------------------------------------------------------------

class _BombHandler(http.server.BaseHTTPRequestHandler):
    BODY = gz(60_000_000)

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        self.wfile.write(self.BODY)


@pytest.fixture
def bomb_server(tls_files):  # noqa: F811
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BombHandler)
    server.daemon_threads = True
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_files / "leaf.pem", tls_files / "leaf.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_a_fetched_gzip_bomb_fails_the_job_before_the_trainer_reads_it(make_settings, bomb_server, tls_files,  # noqa: F811
                                                                     tmp_path):
    from nanochat_studio.app import create_app

    settings = make_settings(mode="lab", expanded_max_bytes=EXPANDED_MAX)
    create_app(settings)
    dana = persona("dana")
    url = f"https://public.test:{bomb_server.server_address[1]}/corpus.txt.gz"
    job = TrainingJob.create(user=dana, config={"depth": 1, "dataset": {"kind": "url", "source": url}})
    with pytest.raises(datasets.DatasetError, match="expands to more than 20,000,000 bytes"):
        datasets.resolve_for_training(job, settings, tmp_path / "run", policy=seam(tls_files))
    assert not any((tmp_path / "run" / "data").glob("*.gz"))  # the bomb is not kept for a retry
