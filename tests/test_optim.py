"""Muon, the AdamW/Muon split and the learning-rate schedule."""

import copy

import pytest

import torch

from trainer import optim

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store


def test_newton_schulz_output_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in [(64, 64), (32, 96), (128, 48)]:
        g = torch.randn(*shape)
        x = optim.newton_schulz(g, steps=5)
        s = torch.linalg.svdvals(x)
        # The quintic iteration lands singular values in a band around 1, not exactly on it; a
        # square Gaussian matrix has a few near-zero singular values that five steps only partly lift.
        assert s.max() < 1.3
        assert (s > 0.6).float().mean() > 0.9, (shape, s)
        s10 = torch.linalg.svdvals(optim.newton_schulz(g, steps=10))
        assert s10.min() > 0.6 and s10.max() < 1.3, (shape, s10.min(), s10.max())
        # Same singular vectors: x is close in direction to the polar factor U V^T.
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        polar = u @ vh
        cos = (x * polar).sum() / (x.norm() * polar.norm())
        assert cos > 0.95


def test_schedule_warms_up_holds_and_warms_down_to_the_final_fraction():
    total = 100
    m = [optim.lr_multiplier(s, total, warmup_ratio=0.1, warmdown_ratio=0.3, final_lr_frac=0.1)
         for s in range(total)]
    assert m[0] == 0.1 and m[9] == 1.0
    assert all(a < b for a, b in zip(m[:10], m[1:10]))
    assert all(v == 1.0 for v in m[10:70])
    assert all(a > b for a, b in zip(m[70:], m[71:]))
    assert abs(m[-1] - (1 / 30 + (1 - 1 / 30) * 0.1)) < 1e-12
    assert min(m) >= 0.1
    assert optim.lr_multiplier(0, 10, 0.0, 0.0) == 1.0


def test_muon_momentum_ramps_then_holds():
    assert optim.muon_momentum(0) == optim.MUON_MOMENTUM_START
    assert abs(optim.muon_momentum(150) - 0.9) < 1e-12
    assert optim.muon_momentum(10_000) == optim.MUON_MOMENTUM


def test_adamw_lrs_scale_with_width():
    assert optim.width_lr_scale(768) == 1.0
    assert abs(optim.width_lr_scale(192) - 2.0) < 1e-12


def _toy():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(16, 32)
    hidden = torch.nn.Linear(32, 32, bias=False)
    head = torch.nn.Linear(32, 16, bias=False)
    groups = {"matrix": [hidden.weight], "embedding": [emb.weight], "lm_head": [head.weight]}
    x = torch.randint(0, 16, (64,))
    y = (x * 3 + 1) % 16

    def loss():
        return torch.nn.functional.cross_entropy(head(torch.relu(hidden(emb(x)))), y)
    return groups, loss


def test_a_few_steps_on_a_toy_problem_lower_the_loss():
    groups, loss_fn = _toy()
    opts = optim.build_optimizers(groups, n_embd=32)
    assert [type(o).__name__ for o in opts] == ["AdamW", "Muon"]
    first = loss_fn().item()
    for step in range(30):
        optim.set_lr(opts, optim.lr_multiplier(step, 30, 0.1, 0.2))
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss_fn().backward()
        for o in opts:
            o.step()
    assert loss_fn().item() < 0.5 * first


def test_optimizer_state_round_trips_and_continues_identically():
    groups, loss_fn = _toy()
    opts = optim.build_optimizers(groups, n_embd=32)

    def step():
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss_fn().backward()
        for o in opts:
            o.step()
    for _ in range(3):
        step()
    saved = copy.deepcopy([o.state_dict() for o in opts])  # state_dict() holds live tensors
    params = [p.detach().clone() for g in groups.values() for p in g]
    step()
    after = [p.detach().clone() for g in groups.values() for p in g]
    # Restore params and optimizer state; the next step must be bit-identical.
    with torch.no_grad():
        for p, v in zip([p for g in groups.values() for p in g], params):
            p.copy_(v)
    for o, sd in zip(opts, saved):
        o.load_state_dict(sd)
    step()
    for p, v in zip([p for g in groups.values() for p in g], after):
        assert torch.equal(p, v)


def test_muon_rejects_vectors():
    try:
        optim.Muon([torch.nn.Parameter(torch.zeros(4))])
    except ValueError:
        return
    raise AssertionError("Muon accepted a 1-D parameter")


def newton_schulz_float64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The direct quintic iteration in float64: the reference both float32 paths are held to."""
    a, b, c = optim._NS_COEFFS
    x = g.double()
    tall = x.size(0) > x.size(1)
    x = x.mT if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).float()


@pytest.mark.parametrize("shape", [(64, 200), (300, 64), (48, 96), (256, 1024), (96, 96)])
def test_newton_schulz_in_the_eigenbasis_is_as_accurate_as_the_iteration(shape, monkeypatch):
    torch.manual_seed(0)
    full_rank = torch.randn(*shape)
    low_rank = torch.randn(shape[0], 3) @ torch.randn(3, shape[1]) + 1e-3 * full_rank  # like real gradients
    for g in (full_rank, low_rank):
        exact = newton_schulz_float64(g)
        fast = optim.newton_schulz(g)  # on CPU: the eigenbasis route
        monkeypatch.setattr(optim, "SPECTRAL", False)
        iterated = optim.newton_schulz(g)
        monkeypatch.undo()
        assert fast.shape == g.shape
        scale = exact.abs().max()
        # float32 rounding, amplified along the near-null directions that the iteration scales up
        # by a^5 ~ 490; the eigenbasis route works with squared singular values, so it loses more
        # there. Measured: at most 4e-4 of the largest entry (low-rank) against 8e-5 for the
        # iteration; a wrong coefficient or a transposed product would be off by ~1e-1.
        assert (fast - exact).abs().max() < 1e-3 * scale
        assert (iterated - exact).abs().max() < 2e-4 * scale


def test_newton_schulz_falls_back_to_the_iteration_when_eigh_fails(monkeypatch):
    g = torch.randn(32, 80)
    with monkeypatch.context() as m:
        m.setattr(optim, "SPECTRAL", False)
        iterated = optim.newton_schulz(g)

    def no_convergence(_):
        raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", no_convergence)
    assert torch.equal(optim.newton_schulz(g), iterated)


def test_muon_orthogonalizes_matrices_side_by_side_repeatably(monkeypatch):
    torch.manual_seed(0)
    jobs = [(torch.randn(*shape), 5) for shape in [(96, 32), (32, 32), (32, 128), (128, 32)] * 2]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the side-by-side path needs two threads (the suite runs with one)
    try:
        first = optim._orthogonalize_all(jobs)
        again = optim._orthogonalize_all(jobs)
        assert optim._pool[2].submit(torch.get_num_threads).result() == 1  # each worker on one thread
        assert torch.get_num_threads() == 2  # and the caller keeps its own
        monkeypatch.setattr(optim, "PARALLEL", False)
        one_by_one = optim._orthogonalize_all(jobs)
    finally:
        torch.set_num_threads(threads)
    for (d, _), a, b, c in zip(jobs, first, again, one_by_one):
        assert a.shape == d.shape
        assert torch.equal(a, b)  # which worker ran which matrix changes nothing
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)  # only the threads' summation order differs
