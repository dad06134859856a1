"""Uploads under the size cap and quota, dataset specs for jobs, and what the trainer is handed.

Personas: alice uploads; bob is a peer who must not reach her datasets by id; admin may use server paths.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import dataclasses
import io
import threading

import fsspec
import pytest

from nanochat_studio import datasets, fetch, secretbox
from nanochat_studio.datasets import DatasetError, QuotaExceeded, resolve_for_training, save_upload, validate_spec
from nanochat_studio.fetch import NetPolicy, TooLarge, URLRefused
from nanochat_studio.models import Dataset, TrainingJob, User
from nanochat_studio.storage import Storage
from tests.s3server import s3_server  # noqa: F401  (fixture)
from tests.test_storage import stored_files, visible
from tests.test_fetch import BODY, https_server, seam, tls_files  # noqa: F401  (fixtures)
from tests.test_jobs import alice, bob, make_settings, store  # noqa: F401  (fixtures: a bare store and its users)

TEXT = b"It was the best of times, it was the worst of times.\n" * 40  # 2,120 bytes


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path, upload_max_bytes=10_000, user_quota_bytes=20_000, url_max_bytes=1 << 20,
                         url_timeout_s=5.0, allow_private_urls=False, allow_server_paths=False)


@pytest.fixture
def admin(store):
    return User.create(email="root@example.com", name="admin", is_admin=True)


def list_s3(options, url):
    """(path, size) of the files under ``url``, listed with ``options`` as the trainer reads a user's
    s3:// source (s3fs through fsspec)."""
    fs, path = fsspec.core.url_to_fs(url, **options)
    return sorted((p, int(i.get("size") or 0)) for p, i in fs.find(path, detail=True).items())


def job_for(user, dataset):
    return TrainingJob.create(user=user, config={"depth": 1, "dataset": dataset})


# -- uploads --------------------------------------------------------------------------------------------
def test_an_upload_streams_into_the_users_prefix(alice, bob, settings, tmp_path):
    ds = save_upload(alice, "../../etc/My Data!.txt", io.BytesIO(TEXT), settings)
    assert ds.name == "My_Data.txt"
    assert ds.storage_key == f"users/{alice.id}/datasets/{ds.id}/My_Data.txt"
    assert (ds.size_bytes, ds.sha256) == (len(TEXT), hashlib.sha256(TEXT).hexdigest())
    assert (tmp_path / "storage" / ds.storage_key).read_bytes() == TEXT
    assert datasets.list_datasets(alice) == [ds] and datasets.list_datasets(bob) == []


@pytest.mark.parametrize("name", ["run.exe", "notes.txt.exe", ".txt", "archive.tar.gz", "data", "x.zip"])
def test_only_text_jsonl_and_parquet_files_are_accepted(alice, settings, name):
    with pytest.raises(DatasetError, match="must be"):
        save_upload(alice, name, io.BytesIO(TEXT), settings)
    assert Dataset.select().count() == 0


def test_a_file_whose_bytes_contradict_its_name_is_refused(alice, settings):
    for name, data in [("table.parquet", TEXT), ("book.txt.gz", TEXT), ("book.txt", b"\x7fELF\x00\x01binary")]:
        with pytest.raises(DatasetError, match="does not look like"):
            save_upload(alice, name, io.BytesIO(data), settings)
    ok = save_upload(alice, "Book.TXT.GZ", io.BytesIO(gzip.compress(TEXT)), settings)
    assert ok.name == "Book.txt.gz"
    assert save_upload(alice, "t.parquet", io.BytesIO(b"PAR1" + b"\x00" * 100 + b"PAR1"), settings).size_bytes == 108


def test_an_upload_over_the_size_cap_is_413_and_leaves_nothing(alice, settings, tmp_path):
    big = b"a" * 10_001
    with pytest.raises(TooLarge, match="10,000 bytes") as e:
        save_upload(alice, "big.txt", io.BytesIO(big), settings)
    assert getattr(e.value, "status", None) == 413 or getattr(e.value, "code", None) == 413
    with pytest.raises(TooLarge):  # a declared size fails before reading
        save_upload(alice, "big.txt", io.BytesIO(b""), settings, size_hint=50_000)
    assert Dataset.select().count() == 0
    assert stored_files(Storage.from_settings(settings), f"users/{alice.id}") == []


def test_the_quota_counts_every_upload_and_names_the_numbers(alice, bob, settings):
    for _ in range(2):
        save_upload(alice, "part.txt", io.BytesIO(b"b" * 9_000), settings)
    with pytest.raises(QuotaExceeded, match=r"18,000 of 20,000 bytes used, 2,000 bytes free"):
        save_upload(alice, "more.txt", io.BytesIO(b"c" * 2_500), settings)
    assert len(datasets.list_datasets(alice)) == 2
    assert save_upload(alice, "fits.txt", io.BytesIO(b"d" * 2_000), settings).size_bytes == 2_000
    with pytest.raises(QuotaExceeded):
        save_upload(alice, "full.txt", io.BytesIO(b"e"), settings)
    assert save_upload(bob, "bobs.txt", io.BytesIO(b"f" * 9_000), settings)  # quotas are per user


def test_only_the_owner_deletes_a_dataset(alice, bob, settings, tmp_path):
    ds = save_upload(alice, "a.txt", io.BytesIO(TEXT), settings)
    with pytest.raises(datasets.NotFound):
        datasets.delete_dataset(bob, ds.id, settings)
    assert (tmp_path / "storage" / ds.storage_key).exists()
    datasets.delete_dataset(alice, ds.id, settings)
    assert not (tmp_path / "storage" / ds.storage_key).exists()
    assert datasets.list_datasets(alice) == []
    with pytest.raises(datasets.NotFound):
        datasets.delete_dataset(alice, ds.id, settings)


def test_uploads_round_trip_through_s3_storage(alice, settings, s3_server, tmp_path):
    settings = dataclasses.replace(settings, storage_url=s3_server.url("ds-test"), storage_options=s3_server.options)
    ds = save_upload(alice, "s3.txt", io.BytesIO(TEXT), settings)
    data, options = resolve_for_training(job_for(alice, f"ds:{ds.id}"), settings, tmp_path / "run")
    assert (data, options) == (str(tmp_path / "run" / "data" / "s3.txt"), None)
    assert open(data, "rb").read() == TEXT
    assert datasets.recorded_source(tmp_path / "run") == {"source": f"ds:{ds.id}", "sha256": ds.sha256,
                                                          "size": len(TEXT)}
    datasets.delete_dataset(alice, ds.id, settings)
    assert not visible(Storage.from_settings(settings), ds.storage_key)


# -- specs ----------------------------------------------------------------------------------------------
def test_specs_are_validated_for_their_user(alice, bob, admin, settings, tmp_path):
    ds = save_upload(alice, "a.txt", io.BytesIO(TEXT), settings)
    assert validate_spec("demo", alice, settings) == {"kind": "demo", "source": "demo"}
    assert validate_spec(f"ds:{ds.id}", alice, settings)["dataset_id"] == ds.id
    with pytest.raises(datasets.NotFound):
        validate_spec(f"ds:{ds.id}", bob, settings)  # another user's id: not found, not forbidden
    with pytest.raises(datasets.NotFound):
        validate_spec("ds:99999", alice, settings)
    with pytest.raises(DatasetError):
        validate_spec("ds:abc", alice, settings)
    for junk in ("", "   ", "relative/path.txt", 42, None, "ftp://x/y", {"source": "demo", "extra": 1}):
        with pytest.raises(DatasetError):
            validate_spec(junk, alice, settings)


def test_url_specs_go_through_the_guard(alice, settings):
    public = NetPolicy(resolve=lambda h, p: ["93.184.215.14"])
    assert validate_spec("https://data.example.com/a.txt", alice, settings, policy=public)["kind"] == "url"
    for url in ("http://data.example.com/a.txt", "https://127.0.0.1/a.txt", "https://169.254.169.254/",
                "https://[::ffff:192.168.0.1]/"):
        with pytest.raises(URLRefused):
            validate_spec(url, alice, settings, policy=public)
    private = NetPolicy(resolve=lambda h, p: ["172.16.0.9"])
    with pytest.raises(URLRefused, match="172.16.0.9"):
        validate_spec("https://sneaky.example.com/a.txt", alice, settings, policy=private)


def test_s3_specs_take_only_the_users_own_credentials(alice, settings):
    assert validate_spec("s3://open-data/corpus/", alice, settings) == {"kind": "s3", "source": "s3://open-data/corpus"}
    # a secret long enough that the sealed token's random base64 cannot contain it by chance ("SK" did,
    # in ~3% of runs)
    secret = "the-user-secret-access-key"
    spec = {"source": "s3://my-bucket/x", "credentials": {"key": "AK", "secret": secret}}
    stored = validate_spec(spec, alice, settings)
    assert "credentials" not in stored and secret not in repr(stored)  # sealed with the secret key
    assert secretbox.unseal(stored["sealed_credentials"], settings) == {"key": "AK", "secret": secret}
    assert datasets.describe_spec(spec) == "s3://my-bucket/x"
    with pytest.raises(URLRefused):
        validate_spec({"source": "s3://my-bucket/x", "credentials": {"profile": "server"}}, alice, settings)
    with pytest.raises(DatasetError, match="only for s3"):
        validate_spec({"source": "https://x.example.com/a.txt", "credentials": {"key": "a", "secret": "b"}},
                      alice, settings)


def test_server_paths_need_the_setting_or_an_admin(alice, admin, settings, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("outside-home")  # the data directory itself is refused to anyone
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT)
    with pytest.raises(datasets.Forbidden):
        validate_spec(str(path), alice, settings)
    assert validate_spec(str(path), admin, settings) == {"kind": "path", "source": str(path)}
    settings = dataclasses.replace(settings, allow_server_paths=True)
    assert validate_spec(str(path) + "/../corpus.txt", alice, settings)["source"] == str(path)
    with pytest.raises(DatasetError, match="does not exist"):
        validate_spec(str(tmp_path / "nope.txt"), alice, settings)


# -- what the trainer gets ------------------------------------------------------------------------------
def test_resolve_hands_the_trainer_something_it_can_read(alice, bob, settings, tmp_path):
    ds = save_upload(alice, "a.txt", io.BytesIO(TEXT), settings)
    assert resolve_for_training(job_for(alice, "demo"), settings) == ("demo", None)
    data, opts = resolve_for_training(job_for(alice, f"ds:{ds.id}"), settings)
    assert opts is None and open(data, "rb").read() == TEXT  # local storage: its own file, no copy
    assert data == str(tmp_path / "storage" / ds.storage_key)
    with pytest.raises(datasets.NotFound):  # a job whose spec names someone else's upload
        resolve_for_training(job_for(bob, f"ds:{ds.id}"), settings)
    normalised = validate_spec({"source": "s3://b-bucket/p", "credentials": {"key": "AK", "secret": "SK"}},
                               alice, settings)
    assert resolve_for_training(job_for(alice, normalised), settings) == (
        "s3://b-bucket/p", {"anon": False, "key": "AK", "secret": "SK"})
    assert resolve_for_training(job_for(alice, "s3://b-bucket/p"), settings) == ("s3://b-bucket/p", {"anon": True})
    path = tmp_path.parent / f"{tmp_path.name}-outside" / "corpus.txt"  # not in the data directory
    path.parent.mkdir()
    path.write_bytes(TEXT)
    with pytest.raises(datasets.Forbidden):  # re-checked at run time, not only at submit
        resolve_for_training(job_for(alice, str(path)), settings)
    assert resolve_for_training(job_for(alice, str(path)), dataclasses.replace(settings, allow_server_paths=True)
                                ) == (str(path), None)


def test_an_https_dataset_is_downloaded_once_into_the_run_dir(alice, settings, https_server, tls_files, tmp_path):
    port = https_server.server_address[1]
    job = job_for(alice, f"https://public.test:{port}/to-data")
    before = len(https_server.hits)
    data, opts = resolve_for_training(job, settings, tmp_path / "run", policy=seam(tls_files))
    assert opts is None and open(data, "rb").read() == BODY
    assert data == str(tmp_path / "run" / "data" / "source.txt")  # "to-data" has no known extension
    fetched = len(https_server.hits) - before
    assert resolve_for_training(job, settings, tmp_path / "run", policy=seam(tls_files))[0] == data
    assert len(https_server.hits) - before == fetched  # a retried attempt reuses the bytes it trained on
    assert datasets.recorded_source(tmp_path / "run")["sha256"] == hashlib.sha256(BODY).hexdigest()
    with pytest.raises(URLRefused):  # and without the test seam the loopback server is refused
        resolve_for_training(job_for(alice, f"https://127.0.0.1:{port}/data"), settings, tmp_path / "run2")


# -- s3 sources never borrow the server's credentials ---------------------------------------------------
class S3Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in S3 endpoint that records the Authorization header and answers an empty listing."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _answer(self, body: bytes, status: int = 200):
        self.server.auth.append(self.headers.get("Authorization"))
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._answer(b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>bucket</Name>'
                     b"<Prefix>p/</Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>"
                     b"<IsTruncated>false</IsTruncated></ListBucketResult>")

    def do_HEAD(self):  # noqa: N802
        self._answer(b"", 404)


@pytest.fixture
def s3_recorder(monkeypatch):
    # The server's own credentials are in the environment, as on a machine with S3 storage configured.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "SERVERKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SERVERSECRET")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), S3Recorder)
    server.auth = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_s3_sources_are_read_unsigned_or_with_the_users_key_never_the_servers(alice, settings, s3_recorder, tmp_path):
    endpoint = f"http://127.0.0.1:{s3_recorder.server_address[1]}"
    loopback_ok = NetPolicy(allow_http=True, is_public=lambda ip: str(ip) == "127.0.0.1")
    for creds, expect in ((None, None), ({"key": "ALICEKEY", "secret": "ALICESECRET"}, "ALICEKEY")):
        s3_recorder.auth.clear()
        options = fetch.s3_options({**(creds or {}), "endpoint_url": endpoint}, settings, policy=loopback_ok)
        list_s3(options, "s3://bucket/p")
        assert s3_recorder.auth, "the client made no request"
        for header in s3_recorder.auth:
            assert "SERVERKEY" not in (header or "")
            assert (header is None) if expect is None else (f"Credential={expect}/" in header)
    with pytest.raises(URLRefused):  # without the seam a loopback endpoint is refused outright
        fetch.s3_options({"endpoint_url": endpoint}, settings)


def test_a_public_bucket_is_listed_anonymously(settings, s3_server):
    bucket = s3_server.new_bucket(public_read=True)
    s3_server.put(bucket, "corpus/a.txt", TEXT)
    options = {"anon": True, "client_kwargs": {"endpoint_url": s3_server.endpoint}}
    assert list_s3(options, f"s3://{bucket}/corpus") == [(f"{bucket}/corpus/a.txt", len(TEXT))]
