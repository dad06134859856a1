"""The model pool against real model-server subprocesses (trainer/serve.py).

Real network: a tiny checkpoint trained by tests/chat_fixtures.py. Scripted servers (a checkpoint dir with
fake_model.json) make crashes, queues and timing deterministic; they run the same server program.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_fixtures import cached_tiny_checkpoint, scripted_checkpoint  # noqa: E402

from nanochat_studio.inference import Final, InferenceError, ModelPool, TooBusy  # noqa: E402
from nanochat_studio.settings import load_settings  # noqa: E402
from trainer import native  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
HI = [{"role": "user", "content": "hi"}]
pytestmark = pytest.mark.process  # every test here starts real model-server processes (and many kill them)


def pool_settings(**fields):
    """Real settings for a pool whose checkpoints are given directly (nothing is written: the key is set)."""
    base = load_settings(environ={"NCS_HOME": "/nonexistent/ncs-pool-tests", "NCS_SECRET_KEY": "k" * 32})
    return dataclasses.replace(base, **fields)


def row(id_: int, path) -> SimpleNamespace:
    return SimpleNamespace(id=id_, path=str(path), checkpoint_key=f"k{id_}")


@pytest.fixture
def make_pool():
    pools = []

    def make(**kw):
        kw.setdefault("max_loaded", 2)
        kw.setdefault("idle_seconds", 600)
        kw.setdefault("queue_limit", 4)
        kw.setdefault("load_timeout", 60)
        p = ModelPool(pool_settings(), checkpoint_dir_of=lambda m: m.path, device="cpu", **kw)
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.close()


def collect(stream) -> tuple[str, Final]:
    text, final = [], None
    for item in stream:
        if isinstance(item, str):
            text.append(item)
        elif isinstance(item, Final):
            final = item
    return "".join(text), final


def test_it_streams_a_real_checkpoint_in_chat_and_complete_modes(make_pool, tmp_path):
    pool = make_pool()
    m = row(1, cached_tiny_checkpoint(tmp_path / "ck"))
    text, final = collect(pool.stream(m, "complete", "Once upon a time", {"max_tokens": 12, "temperature": 0, "seed": 1}))
    assert final.completion_tokens == 12 and final.finish_reason == "length"
    assert final.prompt_tokens > 1 and final.ttft_s is not None and text
    again, _ = collect(pool.stream(m, "complete", "Once upon a time", {"max_tokens": 12, "temperature": 0}))
    assert again == text  # greedy is deterministic: the same server answered the same way
    text, final = collect(pool.stream(m, "chat", HI, {"max_tokens": 8, "temperature": 0.8, "seed": 3}))
    assert 1 <= final.completion_tokens <= 8 and final.finish_reason in ("stop", "length")
    assert pool.loaded() == [1]


def test_model_servers_build_their_c_kernels_into_the_data_directory(tmp_path):
    """The engine's C kernels (trainer/native.py) are built for this machine once, into <home>/native (a
    service's own home may be read-only and its /tmp private); the server reports what it decodes with."""
    home = tmp_path / "home"
    home.mkdir()
    pool = ModelPool(pool_settings(home=str(home)), checkpoint_dir_of=lambda m: m.path, device="cpu", max_loaded=1,
                     idle_seconds=600, queue_limit=4, load_timeout=60)
    try:
        m = row(1, cached_tiny_checkpoint(tmp_path / "ck"))
        text, final = collect(pool.stream(m, "complete", "Once upon a time", {"max_tokens": 4, "temperature": 0}))
        assert final.completion_tokens == 4
        ping = pool._servers[m.id].op({"op": "ping"}, 10.0)
    finally:
        pool.close()
    if not native.compiler():
        assert ping["decode_one"] == "torch" and "no C compiler" in ping["decode_one_reason"]
        return
    (lib,) = (home / "native").glob("decode_one-*.so")
    assert ping["decode_one_reason"] in (f"built {lib}", f"cached {lib}")
    assert ping["decode_one"] in ("native", "torch") and set(ping["decode_one_probe_ms"]) == {"native", "torch"}
    assert stat.S_IMODE((home / "native").stat().st_mode) == 0o700


def test_multibyte_text_arrives_as_whole_characters(make_pool, tmp_path):
    pool = make_pool()
    words = "naïve café — 世界 🙂 ok"
    m = row(1, scripted_checkpoint(tmp_path / "s", words))
    deltas = [d for d in pool.stream(m, "chat", HI, {}) if isinstance(d, str)]
    assert "".join(deltas) == words
    assert all("\ufffd" not in d for d in deltas)  # never half a character


def test_a_bad_checkpoint_is_a_permanent_error_not_a_hang(make_pool, tmp_path):
    pool = make_pool()
    (tmp_path / "broken").mkdir()
    t0 = time.monotonic()
    with pytest.raises(InferenceError) as e:
        collect(pool.stream(row(1, tmp_path / "broken"), "chat", HI, {}))
    assert e.value.permanent and "could not be loaded" in e.value.message
    assert time.monotonic() - t0 < 30


def test_a_request_the_model_rejects_is_a_permanent_error(make_pool, tmp_path):
    pool = make_pool()
    m = row(1, cached_tiny_checkpoint(tmp_path / "ck"))
    with pytest.raises(InferenceError) as e:
        collect(pool.stream(m, "complete", "hello", {"temperature": -1}))
    assert e.value.permanent and "temperature" in e.value.message
    _, final = collect(pool.stream(m, "complete", "hello", {"max_tokens": 3, "temperature": 0}))  # the server is still fine
    assert final.completion_tokens == 3


def test_it_recovers_after_the_server_is_killed_between_requests(make_pool, tmp_path):
    pool = make_pool()
    m = row(1, cached_tiny_checkpoint(tmp_path / "ck"))
    collect(pool.stream(m, "complete", "A", {"max_tokens": 2}))
    pid = pool.server_pid(m)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    _, final = collect(pool.stream(m, "complete", "A", {"max_tokens": 4, "temperature": 0}))
    assert final.completion_tokens == 4
    assert pool.server_pid(m) not in (None, pid)


def test_it_reports_a_crash_during_a_request_then_serves_the_next(make_pool, tmp_path):
    pool = make_pool()
    m = row(1, scripted_checkpoint(tmp_path / "s", "x" * 400, delay_s=0.01))
    stream = pool.stream(m, "chat", HI, {"max_tokens": 400})
    got = []
    with pytest.raises(InferenceError) as e:
        for item in stream:
            got.append(item)
            if len(got) == 5:
                os.kill(pool.server_pid(m), signal.SIGKILL)
    assert not e.value.permanent
    assert "stopped unexpectedly" in e.value.message and "-9" in e.value.message
    assert 5 <= len(got) < 400
    text, final = collect(pool.stream(m, "chat", HI, {"max_tokens": 3}))
    assert text == "xxx" and final.finish_reason == "length"


def test_a_hung_server_times_out_instead_of_hanging(make_pool, tmp_path):
    pool = make_pool(read_timeout=1.0)
    m = row(1, scripted_checkpoint(tmp_path / "s", "y" * 100, delay_s=0.01))
    collect(pool.stream(m, "chat", HI, {"max_tokens": 1}))
    pid = pool.server_pid(m)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(InferenceError) as e:
            collect(pool.stream(m, "chat", HI, {}))
        assert "no answer" in e.value.message and time.monotonic() - t0 < 10
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, final = collect(pool.stream(m, "chat", HI, {"max_tokens": 2, "temperature": 0}))
    assert final.completion_tokens == 2


def test_closing_a_stream_early_cancels_generation_in_the_server(make_pool, tmp_path):
    pool = make_pool()
    m = row(1, scripted_checkpoint(tmp_path / "s", "z" * 1000, delay_s=0.005))
    stream = pool.stream(m, "chat", HI, {"max_tokens": 1000})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = pool.server_stats(m)
        if stats.get("cancelled") == 1 and stats["active"] == 0:
            break
        time.sleep(0.05)
    assert stats["cancelled"] == 1 and stats["active"] == 0
    assert stats["completion_tokens"] < 100  # it stopped, it did not run on to 1000


def test_concurrent_streams_are_interleaved_fairly(make_pool, tmp_path):
    pool = make_pool()
    m = row(1, scripted_checkpoint(tmp_path / "s", "ab" * 30, delay_s=0.002))
    collect(pool.stream(m, "chat", HI, {"max_tokens": 1}))  # warm
    order: list[int] = []
    lock = threading.Lock()

    def run(k):
        for item in pool.stream(m, "chat", HI, {}):
            if isinstance(item, str):
                with lock:
                    order.extend([k] * len(item))  # a delta may hold several tokens

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(order) == [0] * 60 + [1] * 60 + [2] * 60
    # round-robin: nobody finishes before the others have started
    firsts = [order.index(k) for k in range(3)]
    lasts = [len(order) - 1 - order[::-1].index(k) for k in range(3)]
    assert max(firsts) < min(lasts)


def test_past_the_queue_limit_requests_get_toobusy(make_pool, tmp_path):
    pool = make_pool(max_active=1, queue_limit=1)
    m = row(1, scripted_checkpoint(tmp_path / "s", "q" * 200, delay_s=0.01))
    a = pool.stream(m, "chat", HI, {})
    next(a)  # running
    b = pool.stream(m, "chat", HI, {})  # waiting (the one queue place)
    with pytest.raises(TooBusy) as e:
        pool.stream(m, "chat", HI, {})
    assert e.value.status == 429 and "limit" in e.value.message
    a.close()
    b.close()  # never started: still gives its place back
    _, final = collect(pool.stream(m, "chat", HI, {"max_tokens": 2, "temperature": 0}))
    assert final.completion_tokens == 2


def test_streams_over_all_models_are_bounded_below_the_web_threads(make_pool, tmp_path):
    pool = ModelPool(pool_settings(threads=6, max_loaded_models=2, model_idle_seconds=600, chat_queue_limit=8,
                                   inference_device="cpu"), checkpoint_dir_of=lambda m: m.path)
    try:
        assert pool.max_streams == 2  # 6 threads, 4 kept for pages
        a = row(1, scripted_checkpoint(tmp_path / "a", "a" * 100, delay_s=0.01))
        b = row(2, scripted_checkpoint(tmp_path / "b", "b" * 100, delay_s=0.01))
        sa, sb = pool.stream(a, "chat", HI, {}), pool.stream(b, "chat", HI, {})
        with pytest.raises(TooBusy) as e:
            pool.stream(a, "chat", HI, {})
        assert "already answering 2 chats" in e.value.message
        sa.close()
        sb.close()
        assert collect(pool.stream(a, "chat", HI, {"max_tokens": 1}))[0] == "a"
    finally:
        pool.close()


def test_idle_servers_are_stopped(make_pool, tmp_path):
    pool = make_pool(idle_seconds=0.5)
    m = row(1, scripted_checkpoint(tmp_path / "s", "hello"))
    collect(pool.stream(m, "chat", HI, {}))
    pid = pool.server_pid(m)
    deadline = time.monotonic() + 5
    while pool.loaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.loaded() == []
    while time.monotonic() < deadline:  # stopping takes a moment after leaving the pool
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    text, _ = collect(pool.stream(m, "chat", HI, {}))  # loads again on demand
    assert text == "hello"


def test_the_least_recently_used_idle_model_makes_room(make_pool, tmp_path):
    pool = make_pool(max_loaded=2)
    ms = [row(k, scripted_checkpoint(tmp_path / f"s{k}", f"model {k}")) for k in (1, 2, 3)]
    for m in ms[:2]:
        collect(pool.stream(m, "chat", HI, {}))
    collect(pool.stream(ms[0], "chat", HI, {}))  # 1 is now more recent than 2
    text, _ = collect(pool.stream(ms[2], "chat", HI, {}))
    assert text == "model 3" and sorted(pool.loaded()) == [1, 3]


def test_when_every_slot_is_busy_a_new_model_gets_toobusy(make_pool, tmp_path):
    pool = make_pool(max_loaded=1)
    a = row(1, scripted_checkpoint(tmp_path / "a", "a" * 200, delay_s=0.01))
    b = row(2, scripted_checkpoint(tmp_path / "b", "b"))
    s = pool.stream(a, "chat", HI, {})
    next(s)
    with pytest.raises(TooBusy):
        pool.stream(b, "chat", HI, {})
    s.close()
    assert collect(pool.stream(b, "chat", HI, {}))[0] == "b"


def test_stop_strings_cut_the_text_before_them(make_pool, tmp_path):
    pool = make_pool()
    m = row(1, scripted_checkpoint(tmp_path / "s", "one two. three four", tokens_per_delta=2))
    text, final = collect(pool.stream(m, "chat", HI, {"stop": [". th"]}))
    assert text == "one two" and final.finish_reason == "stop"


def test_a_slow_load_yields_heartbeats_instead_of_going_quiet(make_pool, tmp_path):
    pool = make_pool(heartbeat_s=0.2)
    m = row(1, scripted_checkpoint(tmp_path / "s", "ok", load_delay_s=1.0))
    items = list(pool.stream(m, "chat", HI, {}))
    first_text = next(i for i, x in enumerate(items) if isinstance(x, str))
    assert items[:first_text].count(None) >= 3 and "".join(x for x in items if isinstance(x, str)) == "ok"


def test_a_model_server_exits_when_the_web_process_dies(tmp_path):
    import subprocess

    ck = scripted_checkpoint(tmp_path / "s", "hi")
    code = (
        "import sys, types, time\n"
        "from nanochat_studio.inference import ModelPool\n"
        "from nanochat_studio.settings import load_settings\n"
        "s = load_settings(environ={'NCS_HOME': '/nonexistent/ncs-pool-tests', 'NCS_SECRET_KEY': 'k' * 32})\n"
        f"p = ModelPool(s, checkpoint_dir_of=lambda m: {str(ck)!r}, device='cpu')\n"
        "m = types.SimpleNamespace(id=1)\n"
        "list(p.stream(m, 'chat', [{'role': 'user', 'content': 'x'}], {}))\n"
        "print(p.server_pid(m), flush=True)\n"
        "time.sleep(60)\n"
    )
    web = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(web.stdout.readline())
        os.kill(server_pid, 0)  # running
        web.kill()  # kill -9: no atexit, no cleanup
        web.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        with pytest.raises(ProcessLookupError):
            os.kill(server_pid, 0)
    finally:
        web.kill()


def test_the_web_process_does_not_import_torch():
    import subprocess

    code = "import sys, nanochat_studio.inference; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_draining_arrived_lines_never_waits_for_more():
    # a socket with a timeout (as the pool's are) must not make ready() wait for the next message:
    # that held every delta back by one token and, when the last delta and "done" came together,
    # stalled the end of the stream for the whole timeout
    import socket

    from nanochat_studio.modelclient import Lines

    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        a.settimeout(0.5)
        lines = Lines(a)
        b.sendall(b'{"delta": "x"}\n{"done": true}\n')
        assert lines.read() == {"delta": "x"}
        t0 = time.monotonic()
        assert lines.ready() == [{"done": True}]
        assert lines.ready() == []
        assert time.monotonic() - t0 < 0.1
        assert a.gettimeout() == 0.5
    finally:
        a.close()
        b.close()


def test_lines_sent_from_many_threads_at_once_arrive_whole_even_past_the_socket_buffer():
    # every request of the web process sends on one shared connection: lines bigger than the socket's
    # buffer, sent by several threads while the reader is slow, must still arrive whole, each
    # thread's in its order
    import json
    import socket

    from nanochat_studio.modelclient import Channel, Lines

    a, b = socket.socketpair(socket.AF_UNIX)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    chan = Channel(a)
    sizes = [10, 50_000, 100, 300_000, 5]
    got = []

    def read_all():
        lines = Lines(b)
        for _ in range(4 * len(sizes)):
            time.sleep(0.001)  # a slow reader: the buffer fills
            got.append(lines.read())

    reader = threading.Thread(target=read_all)
    reader.start()
    senders = [threading.Thread(target=lambda t=t: [chan.send({"id": f"{t}-{i}", "pad": "x" * n})
                                                  for i, n in enumerate(sizes)]) for t in range(4)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(30)
    reader.join(30)
    assert len(got) == 4 * len(sizes) and all(isinstance(m, dict) for m in got)
    for t in range(4):
        mine = [m for m in got if m["id"].startswith(f"{t}-")]
        assert [m["id"] for m in mine] == [f"{t}-{i}" for i in range(len(sizes))]
        assert [len(m["pad"]) for m in mine] == sizes
    b.close()
    with pytest.raises(OSError):  # the other end is gone: an error for the sender
        for _ in range(3):
            chan.send({"id": "late", "pad": json.dumps(sizes)})
            time.sleep(0.05)
    chan.close()


def test_logprobs_and_echo_reach_the_pool_client_as_deltas(make_pool, tmp_path):
    from nanochat_studio.inference import Delta

    pool = make_pool()
    m = row(1, cached_tiny_checkpoint(tmp_path / "ck"))
    items = list(pool.stream(m, "complete", "Once upon", {"max_tokens": 6, "temperature": 0, "logprobs": 2,
                                                          "echo": True}))
    deltas = [d for d in items if isinstance(d, str)]
    assert all(isinstance(d, Delta) for d in deltas)
    echo = [d for d in deltas if d.echo]
    assert "".join(echo) == "Once upon" and all(e["logprob"] is not None for d in echo for e in d.logprobs)
    generated = [e for d in deltas if not d.echo for e in d.logprobs]
    final = items[-1]
    assert len(generated) == final.completion_tokens == 6  # entries survive the client's coalescing
    assert all(len(e["top"]) == 2 and e["top"][0][0] == e["token"] for e in generated)  # greedy: the best
    # without logprobs or echo the stream is plain text, as before
    plain = [d for d in pool.stream(m, "complete", "Once upon", {"max_tokens": 6, "temperature": 0})
             if isinstance(d, str)]
    assert "".join(plain) == "".join(d for d in deltas if not d.echo)
    assert not any(isinstance(d, Delta) for d in plain)


def test_many_concurrent_streams_of_a_real_model_all_finish_with_their_own_text(make_pool, tmp_path):
    pool = make_pool(max_active=8, queue_limit=8)
    m = row(1, cached_tiny_checkpoint(tmp_path / "ck"))
    prompts = ["Once upon a time", "The fox", "A cat sat", "In the morning", "Tom and", "She ran", "Why", "Hi"]
    alone = [collect(pool.stream(m, "complete", p, {"max_tokens": 16, "temperature": 0}))[0] for p in prompts]
    got: dict[int, str] = {}

    def run(i):
        got[i] = collect(pool.stream(m, "complete", prompts[i], {"max_tokens": 16, "temperature": 0}))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got.get(i) for i in range(len(prompts))] == alone
    stats = pool.server_stats(m)
    assert stats["batched"] > stats["steps"]  # requests shared decoding steps


def test_requests_share_one_connection_and_a_restart_opens_a_new_one(make_pool, tmp_path):
    pool = make_pool()
    m = row(1, scripted_checkpoint(tmp_path / "words", "Hello there."))
    assert collect(pool.stream(m, "complete", "x"))[0] == "Hello there."
    srv = pool._servers[m.id]
    first = srv.channel(1.0)
    streams = [pool.stream(m, "complete", "x") for _ in range(3)]  # open together, read one by one
    assert [collect(s)[0] for s in streams] == ["Hello there."] * 3
    assert srv.channel(1.0) is first and first.alive
    pid = pool.server_pid(m)
    os.kill(pid, signal.SIGKILL)
    srv.proc.wait(10)
    assert collect(pool.stream(m, "complete", "x"))[0] == "Hello there."
    assert srv.channel(1.0) is not first and not first.alive and pool.server_pid(m) != pid
