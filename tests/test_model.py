"""trainer.model: shapes, parameter groups, KV-cache exactness, and that the model learns."""

import pytest
import torch
import torch.nn.functional as F

from trainer import sizing
from trainer.model import GPT, GPTConfig, KVCache

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store

VOCAB = 300


def random_model(depth=2, n_kv_head=None, seq_len=64, seed=0) -> GPT:
    """A model whose every weight is random: the default init zeroes the output projections, which
    would make every block the identity and let a broken attention path pass unnoticed."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_shape(sizing.shape_for(depth, VOCAB, seq_len, n_kv_head=n_kv_head)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.ndim == 2 and p.shape[0] == VOCAB else 0.1)
    return model.eval()


def test_logits_and_loss_have_the_right_shapes():
    model = random_model()
    idx = torch.randint(0, VOCAB, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, VOCAB) and logits.dtype == torch.float32
    assert logits.abs().max() <= model.config.softcap  # soft-capped
    loss = model(idx, targets=idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    per_token = model(idx, targets=idx, loss_reduction="none")
    assert per_token.shape == (3 * 17,)
    assert torch.allclose(per_token.mean(), loss, atol=1e-6)


def test_last_only_gives_the_last_positions_logits():
    model = random_model()
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        # One row takes the decoding head (a matrix-vector product on a transposed copy), nine the
        # training one: other kernels, other summation order. Logits are soft-capped at 15, where
        # float32's spacing is ~1e-6: a few units of it apart (measured 3e-6); a wrong position or
        # a missing cap would be off by ~1.
        torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:], atol=1e-4, rtol=0)


def test_ignored_targets_do_not_count():
    model = random_model()
    idx = torch.randint(0, VOCAB, (2, 10))
    targets = idx.clone()
    targets[:, 5:] = -1
    expected = model(idx[:, :5], targets=idx[:, :5])  # causal: the first 5 logits do not see the rest
    assert torch.allclose(model(idx, targets=targets), expected, atol=1e-5)


def test_init_is_deterministic_and_starts_near_uniform():
    cfg = GPTConfig.from_shape(sizing.shape_for(2, VOCAB, 32))
    torch.manual_seed(1)
    a = GPT(cfg)
    torch.manual_seed(1)
    b = GPT(cfg)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    loss = a(torch.randint(0, VOCAB, (2, 16)), targets=torch.randint(0, VOCAB, (2, 16)))
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.05


def test_param_groups_cover_every_parameter_once():
    model = random_model(depth=3, n_kv_head=1)
    groups = model.param_groups()
    assert set(groups) == {"matrix", "embedding", "lm_head"}
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in groups["matrix"])
    assert groups["embedding"] == [model.wte.weight] and groups["lm_head"] == [model.lm_head.weight]


def test_state_dict_holds_weights_only():
    assert not any("cos" in k or "sin" in k for k in random_model().state_dict())


def test_the_future_does_not_leak_into_the_past():
    model = random_model()
    idx = torch.randint(0, VOCAB, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % VOCAB
    assert torch.allclose(model(idx)[:, :12], model(changed)[:, :12], atol=1e-5)
    assert not torch.allclose(model(idx)[:, 12:], model(changed)[:, 12:], atol=1e-3)


@pytest.mark.parametrize("n_kv_head", [None, 1])
@pytest.mark.parametrize("splits", [
    [7, 5, 1, 1, 6],          # prefill, a multi-token chunk after a prefix, single steps, another chunk
    [1, 1, 1, 3, 2, 12],      # decoding from a single token, then chunks
    [10, 1, 9],
    [20],
])
def test_cached_logits_equal_the_full_forward(n_kv_head, splits):
    model = random_model(depth=2, n_kv_head=n_kv_head)
    torch.manual_seed(sum(splits) + len(splits))
    idx = torch.randint(0, VOCAB, (2, sum(splits)))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, batch_size=2, max_len=32)
        pieces, start = [], 0
        for n in splits:
            pieces.append(model(idx[:, start:start + n], kv_cache=cache))
            start += n
        assert cache.pos == sum(splits)
    # Cached chunks and the full forward run products of other shapes (single rows take MKL's
    # matrix-vector kernels, longer chunks oneDNN's), so they agree to float32 rounding of logits
    # capped at 15 (spacing ~1e-6), not bit for bit: measured at most 1.7e-5 on AVX-512 and AVX2
    # kernels; a cache that drops or misplaces a key is off by ~1e-1 or more.
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)


def test_a_reset_cache_gives_the_same_logits_again():
    model = random_model()
    idx = torch.randint(0, VOCAB, (1, 12))
    cache = KVCache.for_model(model, batch_size=1, max_len=16)
    with torch.no_grad():
        first = model(idx, kv_cache=cache)
        cache.reset()
        again = model(idx, kv_cache=cache)
    assert torch.equal(first, again)


def test_cache_overflow_is_refused():
    model = random_model()
    cache = KVCache.for_model(model, batch_size=1, max_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)


def test_rotary_tables_grow_past_the_precomputed_length():
    model = random_model(seq_len=4)  # tables cover 32 positions
    idx = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        logits = model(idx)
    assert model.cos.size(1) >= 40 and torch.isfinite(logits).all()
    with torch.inference_mode():
        model(torch.randint(0, VOCAB, (1, 100)))
    model.train()
    model(torch.randint(0, VOCAB, (1, 90)), targets=torch.randint(0, VOCAB, (1, 90))).backward()


def test_it_memorises_a_short_text():
    text = b"the quick brown fox jumps over the lazy dog; "
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_shape(sizing.shape_for(2, VOCAB, len(text))))
    data = torch.tensor(list(text * 2), dtype=torch.long)
    x, y = data[None, :len(text)], data[None, 1:len(text) + 1]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    first = None
    for _ in range(150):
        loss = model(x, targets=y)
        first = first if first is not None else loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 < first
    with torch.no_grad():
        assert torch.equal(model(x).argmax(-1), y)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_fused_cpu_loss_matches_the_plain_one_with_gradients(reduction):
    model = random_model(n_kv_head=1)
    idx = torch.randint(0, VOCAB, (3, 40))
    targets = torch.randint(0, VOCAB, (3, 40))
    targets[0, ::3] = -1
    fused = model(idx, targets=targets, loss_reduction=reduction)  # the chunked CPU path
    fused.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    logits = model(idx)  # no targets: plain logits, then the textbook loss
    plain = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1, reduction=reduction)
    plain.backward()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for (name, p), g in zip(model.named_parameters(), fused_grads):
        # The chunked path sums each gradient in another order, so entries differ by float32
        # rounding of the largest terms, not of themselves: the absolute tolerance scales with the
        # tensor's largest gradient (with reduction="sum" they reach ~18; a fixed 1e-5 left a
        # margin of only 1.5x there).
        torch.testing.assert_close(g, p.grad, atol=1e-5 * float(p.grad.abs().max()), rtol=1e-4, msg=name)
    with torch.no_grad():  # evaluation: same loss, no gradients computed
        torch.testing.assert_close(model(idx, targets=targets, loss_reduction=reduction), plain, atol=1e-5, rtol=1e-5)


def test_decoding_follows_weight_updates_and_loads():
    model = random_model()
    idx = torch.randint(0, VOCAB, (1, 6))

    def decode_last():
        cache = KVCache.for_model(model, batch_size=1, max_len=8)
        model(idx[:, :5], kv_cache=cache)
        return model(idx[:, 5:], kv_cache=cache)  # one token, no grad: the decoding path

    with torch.no_grad():
        before = decode_last()
        model.lm_head.weight.mul_(-2.0)  # as an optimizer step would
        after = decode_last()
        torch.testing.assert_close(after, model(idx)[:, 5:], atol=1e-4, rtol=0)
        assert not torch.allclose(before, after)
        model.load_state_dict(random_model(seed=5).state_dict())
        torch.testing.assert_close(decode_last(), model(idx)[:, 5:], atol=1e-4, rtol=0)
