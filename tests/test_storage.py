"""Storage against the local filesystem and a loopback S3 server (moto), through the same tests."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest

from nanochat_studio.checkpoints import publish_checkpoint
from nanochat_studio.storage import MARKER, IntegrityError, KeyNotFound, Storage, StorageError, check_key
from tests.s3server import s3_server  # noqa: F401  (fixture)


def put_bytes(storage: Storage, data: bytes, key: str) -> dict:
    return storage.put_stream(io.BytesIO(data), key)


def visible(storage: Storage, key: str) -> bool:
    """Whether readers see ``key``: a file, or a directory whose marker was written (``size`` answers
    for both and raises KeyNotFound for anything else, a half-uploaded directory included)."""
    try:
        storage.size(key)
    except KeyNotFound:
        return False
    return True


def stored_files(storage: Storage, prefix: str) -> list[str]:
    """Every object under ``prefix``, committed or not (what a failed upload must not leave)."""
    storage.fs.invalidate_cache()
    try:
        return storage.fs.find(f"{storage.root}/{prefix}")
    except FileNotFoundError:
        return []


def make_checkpoint(root: Path, step: int = 100, weights: bytes | None = None) -> Path:
    """A directory shaped like the trainer's: files first, manifest.json (sha256 of each) last."""
    d = root / f"step_{step:07d}"
    (d / "tokenizer").mkdir(parents=True)
    files = {
        "model.safetensors": weights if weights is not None else os.urandom(300_000),
        "optim.pt": b"optimizer state",
        "state.json": json.dumps({"step": step}).encode(),
        "config.json": json.dumps({"depth": 2, "n_embd": 128}).encode(),
        "tokenizer/tokenizer.pkl": b"ranks",
        "tokenizer/meta.json": b'{"vocab_size": 512}',
    }
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    manifest = {"step": step, "files": {rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                                        for rel, data in files.items()}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache")
    s3 = request.getfixturevalue("s3_server")
    prefix = f"t{abs(hash(request.node.name)) % 10**8}"
    return Storage(s3.url(prefix), s3.options, cache_dir=tmp_path / "cache")


def test_a_file_round_trips(storage):
    meta = put_bytes(storage, b"hello world", "users/1/datasets/abc/input.txt")
    assert meta == {"size": 11, "sha256": hashlib.sha256(b"hello world").hexdigest()}
    assert visible(storage, "users/1/datasets/abc/input.txt")
    assert storage.size("users/1/datasets/abc/input.txt") == 11
    with storage.open("users/1/datasets/abc/input.txt") as f:
        assert f.read() == b"hello world"
    assert Path(storage.local_path("users/1/datasets/abc/input.txt")).read_bytes() == b"hello world"
    storage.delete("users/1/datasets/abc")
    assert not visible(storage, "users/1/datasets/abc/input.txt")
    with pytest.raises(KeyNotFound):
        storage.open("users/1/datasets/abc/input.txt")


@pytest.mark.parametrize("key", ["../x", "users/1/../../etc/passwd", "/etc/passwd", "users//1", "a/./b",
                                 "c:/x", "users\\1", "", "users/1/\x00"])
def test_keys_escaping_the_prefix_are_refused(storage, key):
    with pytest.raises(ValueError):
        put_bytes(storage, b"x", key)
    with pytest.raises(ValueError):
        check_key(key)


def test_a_capped_stream_keeps_nothing(storage):
    from nanochat_studio.storage import TooLargeError

    with pytest.raises(TooLargeError):
        storage.put_stream(io.BytesIO(b"x" * (3 << 20)), "users/1/datasets/big/a.txt", max_bytes=2 << 20)
    assert not visible(storage, "users/1/datasets/big/a.txt")
    assert stored_files(storage, "users/1/datasets/big") == []


def test_a_checkpoint_publishes_and_comes_back_verified(storage, tmp_path):
    ckpt = make_checkpoint(tmp_path / "run")
    key = publish_checkpoint(storage, 7, 3, ckpt)
    assert key == "users/7/models/3/checkpoints/step_0000100"
    assert visible(storage, key)
    assert storage.list_committed("users/7/models/3/checkpoints") == [key]
    m = storage.manifest(key)
    assert m["files"]["model.safetensors"]["sha256"] == hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert storage.size(key) == sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    local = Path(storage.local_path(key))
    for p in ckpt.rglob("*"):
        if p.is_file():
            assert (local / p.relative_to(ckpt)).read_bytes() == p.read_bytes()
    assert storage.local_path(key) == str(local)  # cached: same place, no second download
    storage.delete("users/7/models/3")
    assert not visible(storage, key)
    with pytest.raises(KeyNotFound):
        storage.local_path(key)


def test_a_half_uploaded_checkpoint_is_not_visible(storage, tmp_path):
    """Files under the key without the marker (an upload that died) read as absent everywhere."""
    ckpt = make_checkpoint(tmp_path / "run")
    key = "users/7/models/4/checkpoints/step_0000100"
    for rel in ("model.safetensors", "config.json"):
        put_bytes(storage, (ckpt / rel).read_bytes(), f"{key}/{rel}")
    assert not visible(storage, key)
    assert storage.list_committed("users/7/models/4/checkpoints") == []
    with pytest.raises(KeyNotFound):
        storage.manifest(key)
    with pytest.raises(KeyNotFound):
        storage.local_path(key)
    # Publishing over the debris commits a clean copy.
    assert publish_checkpoint(storage, 7, 4, ckpt) == key
    assert visible(storage, key)


def test_the_marker_is_written_after_every_file(tmp_path, s3_server):
    """Watch an S3 upload from another thread: whenever the marker exists, every file listed is there."""
    storage = Storage(s3_server.url("atomic"), s3_server.options)
    reader = Storage(s3_server.url("atomic"), s3_server.options)
    ckpt = make_checkpoint(tmp_path / "run", weights=os.urandom(2 << 20))
    key = "users/1/models/1/checkpoints/step_0000100"
    seen_absent, violations, done = [0], [], threading.Event()

    def watch():
        while not done.is_set():
            reader.fs.invalidate_cache()
            if visible(reader, key):
                for rel in reader.manifest(key)["files"]:
                    if not reader.fs.exists(f"{reader.root}/{key}/{rel}"):
                        violations.append(rel)
                return
            seen_absent[0] += 1

    t = threading.Thread(target=watch)
    t.start()
    publish_checkpoint(storage, 1, 1, ckpt)
    done.set()
    t.join(10)
    assert violations == []
    assert visible(reader, key)


def test_an_unfinished_or_corrupt_checkpoint_is_refused(storage, tmp_path):
    ckpt = make_checkpoint(tmp_path / "run")
    (ckpt / "manifest.json").unlink()
    with pytest.raises(StorageError, match="manifest.json"):
        publish_checkpoint(storage, 1, 1, ckpt)
    ckpt2 = make_checkpoint(tmp_path / "run2")
    (ckpt2 / "model.safetensors").write_bytes(b"torn write")
    with pytest.raises(IntegrityError):
        publish_checkpoint(storage, 1, 2, ckpt2)
    assert not visible(storage, "users/1/models/2/checkpoints/step_0000100")


def test_a_local_copy_that_was_tampered_with_is_refused(tmp_path, s3_server):
    storage = Storage(s3_server.url("tamper"), s3_server.options, cache_dir=tmp_path / "cache")
    key = publish_checkpoint(storage, 1, 1, make_checkpoint(tmp_path / "run"))
    put_bytes(storage, b"not the weights", f"{key}/model.safetensors")  # bytes change, manifest does not
    with pytest.raises(IntegrityError):
        storage.local_path(key)
    assert not (tmp_path / "cache" / key).exists()


def test_republishing_a_key_leaves_no_stale_files(storage, tmp_path):
    ckpt = make_checkpoint(tmp_path / "a")
    key = publish_checkpoint(storage, 1, 1, ckpt)
    (ckpt / "optim.pt").unlink()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["optim.pt"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert publish_checkpoint(storage, 1, 1, ckpt) == key
    assert "optim.pt" not in storage.manifest(key)["files"]
    storage.fs.invalidate_cache()
    assert not storage.fs.exists(f"{storage.root}/{key}/optim.pt")


class FakeModel:
    """The attributes of models.Model the archive reads (a row needs a database; this needs none)."""

    def __init__(self, **kw):
        self.id, self.name, self.step, self.params = 9, "tiny shakespeare d2", 100, 1_234_567
        self.config = {"depth": 2, "seq_len": 256}
        self.metrics = {"final_loss": 2.31, "val_bpb": 1.12}
        self.samples = [{"prompt": "To be", "text": "To be or not\n```\n<script>x</script>"}]
        self.data_source, self.data_sha256 = "https://example.com/shakespeare.txt", "ab" * 32
        self.__dict__.update(kw)


def test_the_download_is_one_streamed_archive_with_weights_config_tokenizer_and_card(storage, tmp_path):
    weights = os.urandom(1 << 20)
    ckpt = make_checkpoint(tmp_path / "run", weights=weights)
    key = publish_checkpoint(storage, 1, 9, ckpt)
    model = FakeModel(checkpoint_key=key, tokenizer_key=f"{key}/tokenizer")
    chunks = list(storage.stream_model_archive(model, {"samples.json": json.dumps(model.samples)}))
    assert len(chunks) > 10  # streamed: random weights do not compress, 1 MiB arrives in ~16 pieces
    assert max(len(c) for c in chunks) < 256 << 10
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:gz") as tar:
        names = sorted(tar.getnames())
        top = "tiny-shakespeare-d2"
        assert names == sorted(f"{top}/{n}" for n in ["model.safetensors", "config.json", "state.json",
                                                      "tokenizer/meta.json", "tokenizer/tokenizer.pkl",
                                                      "manifest.json", "MODEL_CARD.md", "SHA256SUMS",
                                                      "samples.json"])
        shipped = json.loads(tar.extractfile(f"{top}/manifest.json").read())
        assert sorted(shipped["files"]) == ["config.json", "model.safetensors", "state.json",
                                            "tokenizer/meta.json", "tokenizer/tokenizer.pkl"]
        assert shipped["step"] == 100  # the trainer's own fields are kept
        assert tar.extractfile(f"{top}/model.safetensors").read() == weights
        assert json.loads(tar.extractfile(f"{top}/config.json").read())["depth"] == 2
        card = tar.extractfile(f"{top}/MODEL_CARD.md").read().decode()
        sums = tar.extractfile(f"{top}/SHA256SUMS").read().decode()
    assert hashlib.sha256(weights).hexdigest() in card and hashlib.sha256(weights).hexdigest() in sums
    assert "https://example.com/shakespeare.txt" in card and "ab" * 32 in card
    assert "final_loss: 2.31" in card and "python -m trainer.sample" in card
    assert "    <script>x</script>" in card  # model text is indented, inert


def test_an_archive_of_a_missing_checkpoint_fails_before_the_first_byte(storage):
    gen = storage.stream_model_archive(FakeModel(checkpoint_key="users/1/models/404/checkpoints/step_1",
                                                 tokenizer_key=""))
    with pytest.raises(KeyNotFound):
        next(gen)


def test_from_settings_defaults_to_home_storage(tmp_path):
    from nanochat_studio.settings import load_settings

    st = Storage.from_settings(load_settings(environ={"NCS_HOME": str(tmp_path)}))
    put_bytes(st, b"x", "users/1/a.txt")
    assert (tmp_path / "storage" / "users/1/a.txt").read_bytes() == b"x"
    assert MARKER.endswith(".json")


def test_an_oversize_multipart_upload_to_s3_is_aborted(s3_server):
    """Past s3fs's 5 MiB block a capped stream has started a multipart upload; it must be aborted."""
    import boto3

    from nanochat_studio.storage import TooLargeError

    storage = Storage(s3_server.url("mpu"), s3_server.options)
    with pytest.raises(TooLargeError):
        storage.put_stream(io.BytesIO(os.urandom(12 << 20)), "users/1/datasets/9/big.txt", max_bytes=11 << 20)
    assert not visible(storage, "users/1/datasets/9/big.txt")
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    assert client.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads", []) == []


def test_two_model_servers_caching_the_same_checkpoint_at_once_both_get_it(tmp_path, s3_server):
    storage = Storage(s3_server.url("race"), s3_server.options, cache_dir=tmp_path / "cache")
    ckpt = make_checkpoint(tmp_path / "run", weights=os.urandom(1 << 20))
    key = publish_checkpoint(storage, 1, 1, ckpt)
    results, errors = [], []

    def cache():
        try:
            results.append(Storage(s3_server.url("race"), s3_server.options, cache_dir=tmp_path / "cache").local_path(key))
        except Exception as e:  # noqa: BLE001  (collected and asserted below)
            errors.append(e)

    threads = [threading.Thread(target=cache) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(set(results)) == 1
    assert (Path(results[0]) / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert [p.name for p in (tmp_path / "cache" / key).parent.iterdir()] == ["step_0000100"]  # no temp debris


@pytest.mark.process
def test_the_downloaded_archive_loads_with_the_trainers_sample_command(tmp_path, s3_server):
    """A real trainer checkpoint, through S3 storage and the archive, runs as MODEL_CARD.md says."""
    torch = pytest.importorskip("torch")
    import dataclasses
    import subprocess
    import sys

    from trainer import checkpoint, model as model_mod, optim, tokenizer as tok_mod

    cfg = model_mod.GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    gpt = model_mod.GPT(cfg)
    gpt.init_weights()
    tok_mod.Tokenizer.train_from_iterator(["hello world, once upon a time"] * 20, vocab_size=300).save(tmp_path / "tok")
    ckpt = checkpoint.save_checkpoint(tmp_path / "run", 7, gpt, optim.build_optimizers(gpt.param_groups(), n_embd=32),
                                      {}, tmp_path / "tok", {"model": dataclasses.asdict(cfg), "train": {}})
    storage = Storage(s3_server.url("e2e"), s3_server.options)
    key = publish_checkpoint(storage, 1, 5, ckpt)
    archive = b"".join(storage.stream_model_archive(FakeModel(name="e2e", checkpoint_key=key,
                                                              tokenizer_key=f"{key}/tokenizer")))
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(tmp_path / "dl", filter="data")
    assert not (tmp_path / "dl" / "e2e" / "optim.pt").exists()
    loaded, _, meta = checkpoint.load_model(tmp_path / "dl" / "e2e", "cpu")
    idx = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert meta["step"] == 7 and torch.equal(loaded(idx), gpt.eval()(idx))
    out = subprocess.run([sys.executable, "-m", "trainer.sample", "--checkpoint", "e2e", "--prompt", "hello",
                          "--max-tokens", "4", "--device", "cpu", "--seed", "1"], cwd=tmp_path / "dl",
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr[-2000:]
