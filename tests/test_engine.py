"""trainer/engine.py: batched, continuously joined decoding gives every sequence the logits of the
model run on that sequence alone (float32, within 1e-4), and the same greedy text."""

from __future__ import annotations

import time

import pytest
import torch

from trainer import native
from trainer.engine import CacheFull, Chunk, Engine, _NativeStep
from trainer.model import GPT, GPTConfig
from trainer.sample import generate_tokens

pytestmark = pytest.mark.trainer
TOL = 1e-4
HAVE_CC = bool(native.compiler())


def random_model(n_kv_head: int = 4, seed: int = 0, seq_len: int = 64) -> GPT:
    """Untrained weights, but with every matrix (output projections included) far from zero, so each
    block really changes the residual stream and a wrong cache position or mask would show."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=300, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 2 and p.size(0) != 300 else 1.0)
    return model.eval()


def reference_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]  # (T, V): the plain forward on this sequence alone


@pytest.mark.parametrize("attention,native,products", [
    pytest.param("native", "auto", "strips", id="C-strips", marks=pytest.mark.skipif(not HAVE_CC, reason="no cc")),
    pytest.param("native", "auto", "plain", id="C", marks=pytest.mark.skipif(not HAVE_CC, reason="no cc")),
    ("elementwise", "auto", "plain"), ("batched", "auto", "plain"), ("elementwise", "off", "auto"),
    ("batched", "off", "auto")])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_batched_logits_equal_each_sequence_alone_as_requests_join_and_leave(n_kv_head, attention, native, products):
    # decode attention on CPU runs in C per row, streams the cache elementwise or uses batched products
    # (as on CUDA), whichever the engine's probe finds faster; with or without the C kernels for the
    # norms, rotation and cache writes (native="off": no compiler); the products of several rows in C
    # on strip-major weights or torch's: all must hold
    elementwise = attention == "elementwise"
    model = random_model(n_kv_head)
    engine = Engine(model, max_slots=8, initial_slots=1,  # grows while requests join
                    attention=attention, native=native, products=products)
    assert (engine._native is not None) == (native == "auto" and HAVE_CC)
    strip_calls = []
    for w in engine._weights():
        assert (w.strip_mm is not None) == (products == "strips")
        if w.strip_mm is not None:
            w.strip_mm = (lambda f: lambda a, *rest: strip_calls.append(a.size(0)) or f(a, *rest))(w.strip_mm)
    kernel_calls, kernel = [], engine._attend_elementwise
    engine._attend_elementwise = lambda *a: kernel_calls.append(1) or kernel(*a)
    c_calls = []
    if engine._native is not None:
        layer_rows = engine._native.layer_rows
        engine._native.layer_rows = lambda *a: c_calls.append(a[5]) or layer_rows(*a)
    rows_steps = []  # the slots of each step run as one C call (ncs_decode_rows)
    if engine.decode_rows:
        decode_rows = engine._native.decode_rows
        engine._native.decode_rows = lambda *a: rows_steps.append(a[1]) or decode_rows(*a)
    assert engine.decode_rows == (products == "strips" and attention == "native")
    g = torch.Generator().manual_seed(1)
    # (arrival step, prompt, tokens to decode): different lengths, arriving while others decode
    plan = [(0, 7, 20), (0, 1, 12), (2, 30, 9), (3, 12, 25), (5, 3, 4), (9, 45, 6)]
    seqs = []
    for arrive, n_prompt, n_new in plan:
        prompt = torch.randint(0, 300, (n_prompt,), generator=g).tolist()
        forced = torch.randint(0, 300, (n_new,), generator=g).tolist()  # teacher-forced continuation
        seqs.append({"arrive": arrive, "ids": prompt + forced, "prompt": n_prompt, "fed": 0, "slot": None,
                     "got": {}})
    step = 0
    prefill_chunk = 8  # prompts fed in chunks, mixed with others' decode rows
    while any(s["fed"] < len(s["ids"]) for s in seqs):
        chunks, owners = [], []
        for s in seqs:
            if s["arrive"] > step or s["fed"] >= len(s["ids"]):
                continue
            if s["slot"] is None:
                s["slot"] = engine.alloc()
            n = min(prefill_chunk, s["prompt"] - s["fed"]) if s["fed"] < s["prompt"] else 1
            chunks.append(Chunk(s["slot"], s["fed"], s["ids"][s["fed"]:s["fed"] + n], "all"))
            owners.append(s)
        for s, c, logits in zip(owners, chunks, engine.step(chunks)):
            for i in range(len(c.tokens)):
                s["got"][c.start + i] = logits[i]
            s["fed"] += len(c.tokens)
            if s["fed"] == len(s["ids"]):
                engine.release(s["slot"])
        step += 1
    assert engine.slots > 1  # it did run several at once
    assert bool(kernel_calls) == elementwise  # the parametrized kernel is the one that ran
    if engine.decode_rows:
        # every step (none has more than 32 rows) is one C call: streams decoding and prompts' rows together
        assert not c_calls and not strip_calls
        assert any(1 < len(set(slots)) < len(slots) for slots in rows_steps)
    else:
        # the C call attends the decode rows only where it is the attention kept
        assert (max(c_calls, default=0) > 1) == (attention == "native")
        assert bool(c_calls) == (engine._native is not None)
        assert (min(strip_calls, default=0) > 1) == (products == "strips")  # every product of several rows
    for s in seqs:
        ref = reference_logits(model, s["ids"])
        got = torch.stack([s["got"][p] for p in range(len(s["ids"]))])
        assert (got - ref).abs().max().item() < TOL


def test_decode_rows_with_holes_in_the_slot_range_are_exact():
    model = random_model()
    engine = Engine(model, max_slots=4)
    a, b, c = engine.alloc(), engine.alloc(), engine.alloc()
    ids = {a: [5, 6, 7, 8], b: [9, 10], c: [11, 12, 13, 14, 15, 16]}
    engine.step([Chunk(s, 0, ids[s][:-1], "none") for s in (a, b, c)])
    engine.release(b)  # slot b is now a hole between a and c
    out = engine.step([Chunk(a, 3, ids[a][-1:]), Chunk(c, 5, ids[c][-1:])])
    for s, logits in zip((a, c), out):
        assert (logits - reference_logits(model, ids[s])[-1]).abs().max().item() < TOL
    assert engine.alloc() == b  # lowest free slot first keeps the range dense


def test_greedy_text_is_the_same_batched_as_alone():
    model = random_model(seed=3)
    prompts = [[1, 2, 3], [7] * 11, [100, 5], list(range(20, 40))]
    alone = [list(generate_tokens(model, p, max_tokens=25, temperature=0)) for p in prompts]
    engine = Engine(model, max_slots=4)
    slots = [engine.alloc() for _ in prompts]
    logits = engine.step([Chunk(s, 0, p) for s, p in zip(slots, prompts)])
    pos = [len(p) for p in prompts]
    out = [[] for _ in prompts]
    for _ in range(25):
        chunks = []
        for i, lg in enumerate(logits):
            top2 = lg.topk(2).values
            # a near tie may legitimately flip between summation orders; none occurs with these weights
            assert (top2[0] - top2[1]).item() > TOL
            out[i].append(int(lg.argmax()))
            chunks.append(Chunk(slots[i], pos[i], [out[i][-1]]))
            pos[i] += 1
        logits = engine.step(chunks)
    assert out == alone


def test_the_cache_refuses_overflow_and_a_full_engine_says_so():
    engine = Engine(random_model(seq_len=16), max_slots=1)
    slot = engine.alloc()
    with pytest.raises(ValueError, match="overflows"):
        engine.step([Chunk(slot, 10, list(range(8)))])
    with pytest.raises(CacheFull):
        engine.alloc()
    with pytest.raises(ValueError, match="not allocated"):
        engine.step([Chunk(slot + 1, 0, [1])])


@pytest.mark.parametrize("trainable", [True, False])
def test_the_engine_follows_weight_changes_through_sample(trainable):
    model = random_model(seed=4).requires_grad_(trainable)  # False: a model loaded for inference keeps its engine
    before = list(generate_tokens(model, [1, 2, 3], max_tokens=8, temperature=0))
    assert ("_sample_engine" in model.__dict__) is not trainable  # a model in training keeps no copy
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # a training step in between: the sampler must see new weights
    after = list(generate_tokens(model, [1, 2, 3], max_tokens=8, temperature=0))
    plain = list(generate_tokens(model, [1, 2, 3], max_tokens=8, temperature=0, use_cache=False))
    assert after == plain and after != before


@pytest.mark.parametrize("native", ["auto", "off"], ids=["C", "torch-ops"])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_one_stream_decoding_alone_takes_the_short_path_with_the_same_numbers(n_kv_head, native):
    """A lone one-token chunk goes through Engine._decode_one (one C call where a compiler builds it,
    else the torch ops); its logits and cache writes must be the general path's (same slot layout,
    slot 1 with slot 0 allocated) and the plain forward's."""
    model = random_model(n_kv_head=n_kv_head, seed=5)
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    ref = reference_logits(model, ids)
    short, general = Engine(model, max_slots=4, native=native), Engine(model, max_slots=4)
    assert short.decode_one == ("native" if native == "auto" and HAVE_CC else "torch"), short.native_reason
    for e in (short, general):
        e.alloc()
    # slot 1 in each (slot 0 allocated too): the short path must address its own slot's cache rows
    s_short, s_general = short.alloc(), general.alloc()
    assert s_short == s_general == 1
    for e, s in ((short, s_short), (general, s_general)):
        e.step([Chunk(s, 0, ids[:4], "none")])
    calls, decode_one = [], short._decode_one
    short._decode_one = lambda c: calls.append(c.start) or decode_one(c)
    general._decode_one = None  # "all" logits never take it
    for p in range(4, len(ids)):
        one = short.step([Chunk(s_short, p, [ids[p]])])[0]  # one decode chunk: _decode_one
        many = general.step([Chunk(s_general, p, [ids[p]], "all")])[0][0]  # the general path
        assert one.shape == (300,)
        # (the general path attends with batched products, the short one with SDPA: rounding apart)
        torch.testing.assert_close(one, many, rtol=0, atol=TOL)
        torch.testing.assert_close(one, ref[p], rtol=0, atol=TOL)
    # the keys and values it wrote are the general path's, in the same place
    # (the cache is (layer, position, slot, kv_head, d))
    torch.testing.assert_close(short.k[:, :len(ids), 1], general.k[:, :len(ids), 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(short.v[:, :len(ids), 1], general.v[:, :len(ids), 1], rtol=0, atol=1e-5)
    assert short.k[:, :len(ids), 1].abs().sum(-1).all()  # every position of slot 1 written
    assert not short.k[:, :, 0].any()  # slot 0 untouched
    assert calls == list(range(4, len(ids)))


def test_the_short_path_refuses_what_the_general_one_refuses():
    engine = Engine(random_model(seq_len=16), max_slots=2)
    slot = engine.alloc()
    with pytest.raises(ValueError, match="overflows"):
        engine.step([Chunk(slot, 16, [1])])
    with pytest.raises(ValueError, match="not allocated"):
        engine.step([Chunk(slot + 1, 0, [1])])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.step([Chunk(slot, 0, [300])])


def test_a_batching_engine_prepacks_its_weights_where_onednn_applies_and_plain_products_elsewhere():
    from trainer import cpu_ops

    model = random_model()
    prompts = [[5, 9, 17, 2], [40, 41], [7, 7, 7, 7, 7, 7]]
    results = {}
    for onednn in (True, False):
        cpu_ops.set_enabled(onednn)
        try:
            engine = Engine(model, max_slots=4, products="packed")
            packed = [w.packed is not None for layer in engine.layers for w in layer] + [engine.head.packed is not None]
            assert packed == [cpu_ops.enabled()] * len(packed)  # every product packed, or none
            assert engine.products == ("packed" if cpu_ops.enabled() else "unpacked")
            slots = [engine.alloc() for _ in prompts]
            out = engine.step([Chunk(s, 0, p, "all") for s, p in zip(slots, prompts)])
            out += engine.step([Chunk(s, len(p), [3]) for s, p in zip(slots, prompts)])  # three decode rows
            results[onednn] = out
        finally:
            cpu_ops.set_enabled(None)
    for with_packing, plain in zip(results[True], results[False]):
        assert torch.allclose(with_packing, plain, atol=TOL, rtol=0)
    for p, got in zip(prompts, results[True][:3]):
        assert torch.allclose(got, reference_logits(model, p), atol=TOL, rtol=0)
    # one slot (trainer.sample's engine, made anew per generation while training): its many-row products
    # are one prefill, not worth reordering the weights for
    single = Engine(model, max_slots=1)
    assert all(w.packed is None for layer in single.layers for w in layer) and single.head.packed is None
    assert single.products == "unpacked" and single.probe_ms is None
    slot = single.alloc()
    assert torch.allclose(single.step([Chunk(slot, 0, prompts[2], "all")])[0], reference_logits(model, prompts[2]),
                          atol=TOL, rtol=0)


def delayed(fn, seconds: float):
    """``fn`` that first sleeps ``seconds`` (a kernel made to look slower to the engine's timing)."""
    def slow(*args):
        if seconds:
            time.sleep(seconds)
        return fn(*args)
    return slow


def engine_made_while(monkeypatch, model: GPT, patches: list, max_slots: int = 4) -> Engine:
    """A batching engine made while ``patches`` ((object, name, replacement) each) are in place, on one
    torch thread as the model server runs here: with two, a busy machine (CI's other worker) left
    torch's second thread waiting for a core, and a kernel with no delay took 10-80 ms a probe round."""
    for obj, name, replacement in patches:
        monkeypatch.setattr(obj, name, replacement)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Engine(model, max_slots=max_slots)
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()


def test_a_batching_engine_times_the_product_kernels_and_keeps_the_fastest(monkeypatch):
    """No kernel wins on every CPU (oneDNN on packed weights won on an AMD EPYC, torch.mm and then C on
    strip-major weights on an Intel Xeon): the engine times them on its own weights when made and
    keeps one. Whatever it keeps computes the model's logits; the losing copies are freed."""
    from trainer import cpu_ops

    if not cpu_ops.enabled():
        pytest.skip("oneDNN products do not apply on this machine: nothing to choose between")
    model = random_model()
    prompts = [[5, 9, 17, 2], [40, 41], [7, 7, 7, 7, 7, 7]]
    engine = Engine(model, max_slots=4)
    kinds = {"packed", "plain"} | ({"strips"} if HAVE_CC else set())  # C only where it builds
    assert engine.products in kinds
    assert set(engine.probe_ms) == kinds and all(v > 0 for v in engine.probe_ms.values())
    fastest = min(engine.probe_ms.values())
    assert engine.probe_ms[engine.products] == fastest
    weights = [w for layer in engine.layers for w in layer] + [engine.head]
    assert all((w.packed is not None) == (engine.products == "packed") for w in weights)
    assert all((w.strip_mm is not None) == (engine.products == "strips") for w in weights)
    assert all(w.w is None for w in weights)
    slots = [engine.alloc() for _ in prompts]
    out = engine.step([Chunk(s, 0, p, "all") for s, p in zip(slots, prompts)])
    for p, got in zip(prompts, out):
        assert torch.allclose(got, reference_logits(model, p), atol=TOL, rtol=0)

    # the choice follows the timings: the others made to look slower, each kind wins
    original = _NativeStep.strip_product

    def strip_product(native_step, wt):
        product = original(native_step, wt)
        slow = delayed(product, 0 if kept == "strips" else 0.005)
        slow.packed = product.packed  # (what a step of decode rows in one C call reads)
        return slow

    for kept in sorted(kinds):
        chosen = engine_made_while(monkeypatch, model, [
            (cpu_ops, "mm_packed", delayed(cpu_ops.mm_packed, 0 if kept == "packed" else 0.005)),
            (torch, "mm", delayed(torch.mm, 0 if kept == "plain" else 0.005)),
            (_NativeStep, "strip_product", strip_product)])
        assert chosen.products == kept, chosen.probe_ms
    with pytest.raises(ValueError, match="products"):
        Engine(model, max_slots=4, products="fast")


def test_a_batching_engine_times_both_decode_attentions_and_keeps_the_faster(monkeypatch):
    """The elementwise attention won on an AMD EPYC, batched products on an Intel Xeon: the engine
    times both when made. Whatever it keeps runs, and decodes the model's logits."""
    model = random_model()
    engine = Engine(model, max_slots=4)
    kinds = {"elementwise", "batched"} | ({"native"} if HAVE_CC else set())  # C only where it builds
    assert engine.attention in kinds
    assert set(engine.attention_probe_ms) == kinds
    assert engine.attention == min(engine.attention_probe_ms, key=engine.attention_probe_ms.get) or \
        len(set(engine.attention_probe_ms.values())) == 1
    calls, kernel = [], engine._attend_elementwise
    engine._attend_elementwise = lambda *a: calls.append(1) or kernel(*a)
    prompts = [[5, 9, 17, 2], [40, 41], [7, 7, 7, 7, 7, 7]]
    slots = [engine.alloc() for _ in prompts]
    engine.step([Chunk(s, 0, p) for s, p in zip(slots, prompts)])
    out = engine.step([Chunk(s, len(p), [3]) for s, p in zip(slots, prompts)])  # three decode rows
    assert bool(calls) == (engine.attention == "elementwise")
    for p, got in zip(prompts, out):
        assert torch.allclose(got, reference_logits(model, p + [3])[-1], atol=TOL, rtol=0)

    # the choice follows the timings: the others made to look slower, each kind wins
    for kept in sorted(kinds):
        chosen = engine_made_while(monkeypatch, model, [
            (Engine, "_attend_elementwise", delayed(Engine._attend_elementwise, 0 if kept == "elementwise" else 0.005)),
            (torch, "bmm", delayed(torch.bmm, 0 if kept == "batched" else 0.005)),
            (_NativeStep, "layer_rows", delayed(_NativeStep.layer_rows, 0 if kept == "native" else 0.005))])
        assert chosen.attention == kept, chosen.attention_probe_ms
    # one slot, or a choice made by the caller: nothing timed
    assert Engine(model, max_slots=1).attention_probe_ms is None
    assert Engine(model, max_slots=4, attention="batched").attention_probe_ms is None
    with pytest.raises(ValueError, match="attention"):
        Engine(model, max_slots=4, attention="fast")


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_whole_prompts_of_one_length_share_one_attention_call_and_keep_their_logits(n_kv_head):
    """A burst of new requests: prompts of one length prefilled together take one batched attention
    call; a prompt of another length, a continued prompt and decode rows in the same step keep their
    own. Every row's logits equal the sequence alone."""
    model = random_model(n_kv_head)
    engine = Engine(model, max_slots=8)
    calls, batched = [], engine._attend_prompts
    engine._attend_prompts = lambda q, k, v, b, t: calls.append((b, t)) or batched(q, k, v, b, t)
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(0, 300, (n,), generator=g).tolist()  # noqa: E731
    running, continued = ids(6), ids(10)
    s_run, s_cont = engine.alloc(), engine.alloc()
    engine.step([Chunk(s_run, 0, running), Chunk(s_cont, 0, continued[:4], "none")])
    same = [ids(7) for _ in range(4)]
    other = ids(5)
    slots = [engine.alloc() for _ in range(5)]
    chunks = ([Chunk(s, 0, p, "all") for s, p in zip(slots, same)] + [Chunk(slots[4], 0, other, "all"),
              Chunk(s_run, len(running), [11]), Chunk(s_cont, 4, continued[4:], "all")])
    out = engine.step(chunks)
    assert calls == [(4, 7)] * model.config.n_layer  # one call a layer for the four prompts of 7 tokens
    for p, got in zip(same + [other], out[:5]):
        assert torch.allclose(got, reference_logits(model, p), atol=TOL, rtol=0)
    assert torch.allclose(out[5], reference_logits(model, running + [11])[-1], atol=TOL, rtol=0)
    assert torch.allclose(out[6], reference_logits(model, continued)[4:], atol=TOL, rtol=0)
