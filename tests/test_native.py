"""The engine's one-row decode step in C (trainer/decode_one.c, built by trainer/native.py): built once per
compiler and CPU into a private cache, rebuilt when the cached copy is unusable, and never used where it
cannot be built or where it disagrees with the torch ops; its numbers are the model's."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import native
from trainer.engine import Chunk, Engine, _NativeStep
from trainer.sample import generate_tokens

from tests.test_engine import TOL, delayed, engine_made_while, random_model, reference_logits

pytestmark = pytest.mark.trainer
REPO = Path(__file__).resolve().parents[1]
needs_cc = pytest.mark.skipif(not native.compiler(),
                              reason="no C compiler on this machine")


def load_in_a_child(cache: Path, **env) -> dict:
    """native.load in a fresh interpreter (this one may have the library mapped already)."""
    code = ("import json, sys; from trainer import native; lib, how = native.load('decode_one'); "
            "print(json.dumps({'loaded': lib is not None, 'how': how}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "NCS_NATIVE_CACHE": str(cache), **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@needs_cc
def test_the_library_is_built_once_into_a_private_cache_and_rebuilt_when_the_cached_copy_is_broken(tmp_path):
    cache = tmp_path / "native"
    first = load_in_a_child(cache)
    assert first["loaded"] and first["how"].startswith("built "), first
    (lib,) = cache.glob("decode_one-*.so")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert load_in_a_child(cache) == {"loaded": True, "how": f"cached {lib}"}
    lib.write_bytes(b"not a shared library")  # truncated, or built for another machine
    again = load_in_a_child(cache)
    assert again == {"loaded": True, "how": f"built {lib}"}, again
    assert not list(cache.glob(".*.tmp"))  # no half-written files left behind


def test_without_a_working_compiler_or_when_turned_off_the_engine_uses_its_torch_ops(tmp_path, monkeypatch):
    model = random_model(seed=2)
    ids = [5, 7, 11, 13, 17, 19]
    ref = reference_logits(model, ids)
    for env, reason in (({"NCS_NATIVE": "0"}, "turned off by NCS_NATIVE"),
                        ({"CC": "/bin/false"}, "could not build"),
                        ({"CC": str(tmp_path / "no-such-cc")}, "does not run")):
        monkeypatch.setattr(native, "_loaded", {})
        monkeypatch.setenv("NCS_NATIVE_CACHE", str(tmp_path / "cache"))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert load_in_a_child(tmp_path / "cache", **env)["loaded"] is False
        engine = Engine(model, max_slots=2)
        assert engine.decode_one == "torch" and reason in engine.native_reason, engine.native_reason
        slot = engine.alloc()
        engine.step([Chunk(slot, 0, ids[:3], "none")])
        for p in range(3, len(ids)):
            torch.testing.assert_close(engine.step([Chunk(slot, p, [ids[p]])])[0], ref[p], rtol=0, atol=TOL)
        for key in env:
            monkeypatch.delenv(key)
    assert not list((tmp_path / "cache").glob("*.so"))


@needs_cc
def test_a_library_that_disagrees_with_the_torch_ops_is_left_out(monkeypatch):
    monkeypatch.setattr(_NativeStep, "checked", {})
    call = _NativeStep.__call__
    monkeypatch.setattr(_NativeStep, "__call__", lambda self, *a: call(self, *a).add_(1e-3))
    engine = Engine(random_model(seed=3), max_slots=2)
    assert engine.decode_one == "torch"
    assert "differ from the torch ops' by 0.001" in engine.native_reason
    assert not engine.k.any() and not engine.v.any()  # the check leaves the slot it used as it was
    # the verdict is kept for the process (engines of a model in training are made often)
    assert "differ" in Engine(random_model(seed=3), max_slots=2).native_reason
    monkeypatch.setattr(_NativeStep, "__call__", call)
    monkeypatch.setattr(_NativeStep, "checked", {})
    good = Engine(random_model(seed=3), max_slots=2)
    assert good._native is not None and not good.native_reason.endswith("not used")


@needs_cc
def test_a_lone_row_decodes_with_whichever_step_was_faster_when_timed(monkeypatch):
    """The C step is timed against the torch ops once per process and model shape (a compiler could
    build something slower than torch's kernels); a lone row runs the faster, and both give the model's
    logits."""
    model = random_model(seed=4)
    ids = [2, 4, 6, 8, 10, 12]
    ref = reference_logits(model, ids)
    for slow, kept in (("__call__", "torch"), ("_decode_torch", "native")):
        monkeypatch.setattr(_NativeStep, "checked", {})
        owner = _NativeStep if slow == "__call__" else Engine
        # (made on one torch thread, as engine_made_while does: with two on a busy machine the torch
        # step waited for a core, 8.5 ms a call, and outran the delayed C step)
        engine = engine_made_while(monkeypatch, model, [(owner, slow, delayed(getattr(owner, slow), 0.003))],
                                   max_slots=2)
        assert engine.decode_one == kept, engine.decode_one_probe_ms
        assert set(engine.decode_one_probe_ms) == {"native", "torch"}
        assert engine._native is not None  # the C calls of many-row steps stay either way
        calls = []
        for name in ("__call__", "_decode_torch"):
            target = _NativeStep if name == "__call__" else Engine
            fn = getattr(target, name)
            monkeypatch.setattr(target, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
        slot = engine.alloc()
        engine.step([Chunk(slot, 0, ids[:2], "none")])
        for p in range(2, len(ids)):
            torch.testing.assert_close(engine.step([Chunk(slot, p, [ids[p]])])[0], ref[p], rtol=0, atol=TOL)
        monkeypatch.undo()
        assert calls == [{"native": "__call__", "torch": "_decode_torch"}[kept]] * (len(ids) - 2)
    # timed once: a later engine of that shape reuses the verdict
    monkeypatch.setattr(_NativeStep, "checked", {})
    first = Engine(model, max_slots=2)
    monkeypatch.setattr(Engine, "_probe", lambda *a: pytest.fail("timed again"))
    assert Engine(model, max_slots=1).decode_one_probe_ms == first.decode_one_probe_ms


@needs_cc
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_the_c_step_follows_the_cache_as_it_grows_and_decodes_the_same_greedy_text(n_kv_head):
    model = random_model(n_kv_head=n_kv_head, seed=11, seq_len=32)
    engine = Engine(model, max_slots=8, initial_slots=2)
    assert engine.decode_one == "native", engine.native_reason
    ids = [9, 8, 7, 6, 5, 4, 3, 2, 1, 30, 31, 32]
    ref = reference_logits(model, ids)
    slots = [engine.alloc() for _ in range(6)]  # 2 -> 4 -> 8 slots: the cache moved twice
    assert engine.slots == 8
    slot = slots[5]
    engine.step([Chunk(slot, 0, ids[:5], "none")])
    for p in range(5, len(ids)):
        torch.testing.assert_close(engine.step([Chunk(slot, p, [ids[p]])])[0], ref[p], rtol=0, atol=TOL)
    assert not engine.k[:, :, slots[4]].any()  # its neighbour's rows untouched
    # a long greedy generation (past the window: the cache is rebuilt from the last half window) is
    # the same text with the C step as with the torch ops
    model.requires_grad_(False)
    prompt = [1, 2, 3, 4, 5]
    native_text = list(generate_tokens(model, prompt, max_tokens=60, temperature=0))
    assert model.__dict__["_sample_engine"][1].decode_one == "native"  # the engine it kept
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NCS_NATIVE", "0")
        mp.setattr(native, "_loaded", {})
        model.requires_grad_(True)  # a fresh engine (no kept one), made with the C step off
        torch_text = list(generate_tokens(model, prompt, max_tokens=60, temperature=0))
    assert native_text == torch_text and len(native_text) == 60


def test_the_engine_refuses_an_unknown_native_setting_and_c_attention_without_c():
    with pytest.raises(ValueError, match="native must be auto or off"):
        Engine(random_model(), native="yes")
    with pytest.raises(ValueError, match="needs the C kernels, which are not available here: turned off"):
        Engine(random_model(), max_slots=4, native="off", attention="native")


@needs_cc
def test_strip_products_equal_torch_products_for_any_rows_and_width():
    """ncs_mm_strips, on shapes the depth-4 model never has: widths that leave the last strip part
    empty, row counts around the rows a pass takes (16 with AVX-512, 8 with AVX, else 4)."""
    engine = Engine(random_model(), max_slots=4, products="strips")
    step = engine._native
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in ((64, 37), (96, 1000), (256, step.strip_width), (48, 7), (5, 3)):
        wt = torch.randn(n_in, n_out, generator=g)
        product = step.strip_product(wt)
        per_pass = step.strip_rows
        for rows in sorted({1, 2, per_pass - 1, per_pass, per_pass + 1, 2 * per_pass + 1, 40}):
            a, add = torch.randn(rows, n_in, generator=g), torch.randn(rows, n_out, generator=g)
            torch.testing.assert_close(product(a), a @ wt, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(product(a, add), add + a @ wt, rtol=1e-5, atol=1e-4)
        view = torch.randn(n_in, 3, generator=g).t()  # a transposed view: made contiguous first
        torch.testing.assert_close(product(view), view @ wt, rtol=1e-5, atol=1e-4)
    with pytest.raises(AssertionError):
        product(torch.randn(2, n_in + 1))  # the C code trusts the shapes: checked before the call


@needs_cc
def test_strips_run_the_products_of_a_few_rows_and_torch_those_of_long_prompts(monkeypatch):
    model = random_model(seed=4)
    # (attention not "native": a step of <= 32 rows would be one C call, ncs_decode_rows, instead of
    # step()'s products)
    engine = Engine(model, max_slots=4, products="strips", attention="batched")
    assert not engine.decode_rows
    rows = []
    for w in engine._weights():
        w.strip_mm = (lambda f: lambda a, *rest: rows.append(a.size(0)) or f(a, *rest))(w.strip_mm)
    g = torch.Generator().manual_seed(4)
    long, short = (torch.randint(0, 300, (n,), generator=g).tolist() for n in (40, 5))
    a, b = engine.alloc(), engine.alloc()
    out = engine.step([Chunk(a, 0, long[:-1], "all")])  # 39 rows: torch.mm
    assert rows == []
    out += engine.step([Chunk(a, 39, long[-1:], "all"), Chunk(b, 0, short, "all")])  # 6 rows: the strips
    assert set(rows) == {6} and len(rows) == 4 * len(engine.layers) + 1
    torch.testing.assert_close(torch.cat(out[:2]), reference_logits(model, long), rtol=0, atol=TOL)
    torch.testing.assert_close(out[2], reference_logits(model, short), rtol=0, atol=TOL)
    with monkeypatch.context() as mp:  # the strips need the C kernels and several slots
        mp.setenv("NCS_NATIVE", "0")
        mp.setattr(native, "_loaded", {})
        with pytest.raises(ValueError, match="products='strips' needs the C kernels"):
            Engine(model, max_slots=4, products="strips")
    with pytest.raises(ValueError, match="products='strips' needs an engine of several slots"):
        Engine(model, max_slots=1, products="strips")


@needs_cc
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_streams_decoding_together_step_in_one_c_call_with_each_sequences_own_logits(n_kv_head):
    """With the strips' products and the C attention kept, a step of one-token rows is one C call
    (ncs_decode_rows); streams join (a prefill step, torch's products) and leave between such steps,
    the cache grows, and every row's logits stay the sequence's own."""
    model = random_model(n_kv_head, seed=5)
    engine = Engine(model, max_slots=8, initial_slots=1, products="strips", attention="native")
    assert engine.decode_rows
    calls = []
    rows = engine._native.decode_rows
    engine._native.decode_rows = lambda *a: calls.append(len(a[1])) or rows(*a)
    g = torch.Generator().manual_seed(5)
    # (joins at step, prompt length, tokens decoded)
    plan = [(0, 5, 9), (0, 1, 4), (0, 12, 7), (2, 3, 8), (4, 20, 3)]
    seqs = [{"join": j, "ids": torch.randint(0, 300, (p + t,), generator=g).tolist(), "prompt": p, "fed": 0,
             "slot": None, "got": {}} for j, p, t in plan]
    step = 0
    while any(s["fed"] < len(s["ids"]) for s in seqs):
        chunks, owners = [], []
        for s in seqs:
            if s["join"] <= step and s["fed"] < len(s["ids"]):
                if s["slot"] is None:
                    s["slot"] = engine.alloc()
                n = s["prompt"] if s["fed"] == 0 else 1
                chunks.append(Chunk(s["slot"], s["fed"], s["ids"][s["fed"]:s["fed"] + n], "last"))
                owners.append(s)
        for s, c, logits in zip(owners, chunks, engine.step(chunks)):
            s["fed"] += len(c.tokens)
            s["got"][s["fed"] - 1] = logits
            if s["fed"] == len(s["ids"]):
                engine.release(s["slot"])
        step += 1
    assert engine.slots > 1 and len(calls) >= 4 and max(calls) >= 3  # several rows at once, in C
    for s in seqs:
        ref = reference_logits(model, s["ids"])
        for p, got in s["got"].items():
            torch.testing.assert_close(got, ref[p], rtol=0, atol=TOL)

    # a bad row refuses the whole step before anything is written
    a, b = engine.alloc(), engine.alloc()
    engine.step([Chunk(a, 0, [1, 2]), Chunk(b, 0, [3, 4])])
    cache = engine.k.clone(), engine.v.clone()
    with pytest.raises(ValueError, match="out of range"):
        engine.step([Chunk(a, 2, [5]), Chunk(b, 2, [10 ** 6])])
    assert torch.equal(engine.k, cache[0]) and torch.equal(engine.v, cache[1])
    with pytest.raises(ValueError, match="not allocated"):
        engine.step([Chunk(a, 2, [5]), Chunk(7, 2, [5])])


@needs_cc
@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_prompts_joining_decoding_streams_run_in_the_same_c_call_and_only_wanted_rows_reach_the_head(n_kv_head):
    """A step of up to 32 rows with prompts in it (whole, or a piece continuing a cache) is one C call
    too; a prompt's rows whose logits nobody wants stop after writing the last layer's keys and values,
    and what later steps read of them is exact. Past 32 rows, step()'s torch products take over."""
    model = random_model(n_kv_head, seed=7)
    engine = Engine(model, max_slots=8, products="strips", attention="native")
    assert engine.decode_rows
    calls = []
    rows = engine._native.decode_rows
    engine._native.decode_rows = lambda *a: calls.append((list(a[1]), list(a[4]))) or rows(*a)
    g = torch.Generator().manual_seed(7)
    ids = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (14, 9, 6, 40)]
    ref = [reference_logits(model, x) for x in ids]
    a, b, c, d = (engine.alloc() for _ in ids)
    # a starts alone; then a decodes while b's whole prompt, the first piece of c's (no logits) and a
    # piece of nothing else join in one step
    out = engine.step([Chunk(a, 0, ids[0][:13], "last")])
    torch.testing.assert_close(out[0], ref[0][12], rtol=0, atol=TOL)
    out = engine.step([Chunk(a, 13, ids[0][13:], "last"), Chunk(b, 0, ids[1], "last"),
                       Chunk(c, 0, ids[2][:4], "none")])
    assert calls[-1] == ([a] * 1 + [b] * 9 + [c] * 4, [0, 9])  # one call; the head sees a's row and b's last
    torch.testing.assert_close(out[0], ref[0][13], rtol=0, atol=TOL)
    torch.testing.assert_close(out[1], ref[1][8], rtol=0, atol=TOL)
    assert out[2] is None
    # c's rest continues its cache (scored, every row) beside a decode row of b
    nxt = torch.randint(0, 300, (1,), generator=g).tolist()
    out = engine.step([Chunk(c, 4, ids[2][4:], "all"), Chunk(b, 9, nxt, "last")])
    assert calls[-1][1] == [0, 1, 2]
    torch.testing.assert_close(out[0], ref[2][4:], rtol=0, atol=TOL)
    torch.testing.assert_close(out[1], reference_logits(model, ids[1] + nxt)[-1], rtol=0, atol=TOL)
    # 40 rows where splitting lost its probe: torch's products, no C call; the logits agree all the same
    engine.split_rows = False
    n_calls = len(calls)
    out = engine.step([Chunk(d, 0, ids[3], "last")])
    assert len(calls) == n_calls
    torch.testing.assert_close(out[0], ref[3][-1], rtol=0, atol=TOL)
    # a bad token in a prompt's rows refuses the whole step before anything is written; so do two
    # chunks of one slot
    e = engine.alloc()
    cache = engine.k.clone(), engine.v.clone()
    with pytest.raises(ValueError, match="out of range"):
        engine.step([Chunk(e, 0, [1, 2, 10 ** 6, 3]), Chunk(a, 14, [5])])
    with pytest.raises(ValueError, match="one chunk per slot"):
        engine.step([Chunk(e, 0, [1, 2]), Chunk(e, 2, [3])])
    assert torch.equal(engine.k, cache[0]) and torch.equal(engine.v, cache[1])


@needs_cc
def test_a_step_longer_than_one_c_call_is_cut_into_calls_where_that_won_its_probe():
    """Past 32 rows a step runs as C calls of up to 32 rows where that was faster than step()'s torch
    products when the engine was made: a prompt cut between two calls leaves its keys and values for
    the next call's rows, scored prompts get every row's logits across the cut, and a bad token
    anywhere refuses the step before any call writes the cache."""
    model = random_model(2, seed=8)
    engine = Engine(model, max_slots=8, products="strips", attention="native")
    assert engine.decode_rows and set(engine.split_probe_ms) == {"torch", "split"}
    assert engine.split_rows == (engine.split_probe_ms["split"] < engine.split_probe_ms["torch"])
    assert not engine._used and torch.count_nonzero(engine.k) == 0  # the probe's slot is left as found
    engine.split_rows = True  # (whichever won here: the cut itself is what is tested)
    calls = []
    rows = engine._native.decode_rows
    engine._native.decode_rows = lambda *a: calls.append(len(a[1])) or rows(*a)
    g = torch.Generator().manual_seed(8)
    ids = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (6, 30, 45, 12)]
    ref = [reference_logits(model, x) for x in ids]
    a, b, c, d = (engine.alloc() for _ in ids)
    engine.step([Chunk(a, 0, ids[0][:5], "none")])
    # a decodes, c's 45 rows, b's whole prompt (scored) and d's 12: 88 rows in calls of 32 (a, 31 of c),
    # 32 (14 of c, 18 of b) and 24 (12 of b, d)
    out = engine.step([Chunk(a, 5, ids[0][5:], "last"), Chunk(c, 0, ids[2], "last"), Chunk(b, 0, ids[1], "all"),
                       Chunk(d, 0, ids[3], "none")])
    assert calls[-3:] == [32, 32, 24]
    torch.testing.assert_close(out[0], ref[0][5], rtol=0, atol=TOL)
    torch.testing.assert_close(out[1], ref[2][-1], rtol=0, atol=TOL)
    torch.testing.assert_close(out[2], ref[1], rtol=0, atol=TOL)  # every row's, across the cut
    assert out[3] is None
    # what the cut left in the cache is exact: the next tokens of c and d
    nxt = [torch.randint(0, 300, (1,), generator=g).tolist() for _ in range(2)]
    out = engine.step([Chunk(c, 45, nxt[0]), Chunk(d, 12, nxt[1])])
    torch.testing.assert_close(out[0], reference_logits(model, ids[2] + nxt[0])[-1], rtol=0, atol=TOL)
    torch.testing.assert_close(out[1], reference_logits(model, ids[3] + nxt[1])[-1], rtol=0, atol=TOL)
    # a bad token in the last call's rows: nothing is written, not even the first call's rows
    engine.release(a)
    e = engine.alloc()
    cache = engine.k.clone(), engine.v.clone()
    with pytest.raises(ValueError, match="out of range"):
        engine.step([Chunk(e, 0, list(range(40)) + [10 ** 6])])
    assert torch.equal(engine.k, cache[0]) and torch.equal(engine.v, cache[1])
