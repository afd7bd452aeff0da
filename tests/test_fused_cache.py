"""The fused kernel never runs on stale weights and never shares buffers between concurrent calls.

Issue 8 item 5: a cache keyed on parameters' version counters missed fused/foreach optimizer steps
and ``p.data`` writes (neither bumps the counter), and one-step calls shared one buffer set per
module, so threads generating with one model at once corrupted each other's steps. Every test
compares a no-grad fused call with the per-step reference holding the same (current) weights.
"""

from __future__ import annotations

import threading

import pytest
import torch

from nlstm import CharLM, ModelConfig, NestedLSTM

TIGHT = dict(atol=1e-10, rtol=1e-10)


def model_pair(dtype=torch.float64, input_size=5, hidden=7, depth=2, seed=0):
    torch.manual_seed(seed)
    fus = NestedLSTM(input_size, hidden, depth=depth, impl="fused").to(dtype)
    ref = NestedLSTM(input_size, hidden, depth=depth, impl="reference").to(dtype)
    return fus, ref


def assert_matches_reference(fus, ref, x, **tol):
    """``fus`` under no_grad, whole sequence and one step, against ``ref`` loaded with fus's weights."""
    ref.load_state_dict(fus.state_dict())
    with torch.no_grad():
        for xs in (x, x[:, :1]):
            got, (h, cs) = fus(xs)
            want, (h_ref, cs_ref) = ref(xs)
            torch.testing.assert_close(got, want, **tol)
            for a, b in zip(cs, cs_ref, strict=True):
                torch.testing.assert_close(a, b, **tol)


def warm(fus, x):
    """No-grad calls of both kinds (whole sequence, one step): whatever can be cached is now cached."""
    with torch.no_grad():
        fus(x)
        fus(x[:, :1])


def train_step(model, opt, x):
    opt.zero_grad()
    model(x)[0].square().sum().backward()
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("flavour", ["fused", "foreach", "for-loop"])
def test_optimizer_step_then_no_grad_forward_uses_new_weights(flavour, dtype):
    fus, ref = model_pair(dtype)
    x = torch.randn(3, 6, 5, dtype=dtype)
    warm(fus, x)
    kw = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[flavour]
    opt = torch.optim.Adam(fus.parameters(), lr=0.05, **kw)
    for _ in range(2):
        train_step(fus, opt, x)
        tol = TIGHT if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
        assert_matches_reference(fus, ref, x, **tol)


@pytest.mark.parametrize("how", ["data-inplace", "data-assign", "copy-no-grad", "load-state-dict", "set-data-same"])
def test_weight_writes_that_bypass_or_keep_version_are_seen(how):
    fus, ref = model_pair()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    warm(fus, x)
    other = NestedLSTM(5, 7, depth=2).double()
    with torch.no_grad():
        for p in other.parameters():
            p.uniform_(-0.5, 0.5)
    if how == "data-inplace":  # .data shares storage with a fresh version counter
        for p in fus.parameters():
            p.data.mul_(0.5).add_(0.1)
    elif how == "data-assign":
        for p, q in zip(fus.parameters(), other.parameters(), strict=True):
            p.data = q.detach().clone()
    elif how == "copy-no-grad":
        with torch.no_grad():
            for p, q in zip(fus.parameters(), other.parameters(), strict=True):
                p.copy_(q)
    elif how == "load-state-dict":
        fus.load_state_dict(other.state_dict())
    else:  # set_() onto a same-sized storage: the version counter and shape do not change
        for p, q in zip(fus.parameters(), other.parameters(), strict=True):
            p.data.set_(q.detach().clone())
    assert_matches_reference(fus, ref, x, **TIGHT)


def test_writes_to_a_shared_storage_are_seen():
    """Weights that are views of a tensor written elsewhere (e.g. a flat parameter buffer)."""
    fus, ref = model_pair()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    flat = torch.cat([p.detach().reshape(-1) for p in fus.parameters()])
    offset = 0
    for p in fus.parameters():
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    warm(fus, x)
    flat.mul_(0.7)  # bumps flat's counter, which the parameters (via .data) do not share
    assert_matches_reference(fus, ref, x, **TIGHT)


def _steps(model, xs, state):
    outs = []
    with torch.no_grad():
        for x in xs:
            out, state = model(x, state)
            outs.append(out)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_four_threads_stepping_one_model_match_sequential(dtype):
    """One-step (T=1) no-grad calls from four threads at once, each its own stream and batch size."""
    torch.manual_seed(1)
    model = NestedLSTM(6, 24, depth=3).to(dtype).eval()
    streams = [torch.randn(400, b, 1, 6, dtype=dtype) for b in (1, 2, 3, 3)]
    want = [_steps(model, s, None)[0] for s in streams]
    got: list = [None] * len(streams)
    errors: list = []
    barrier = threading.Barrier(len(streams))

    def work(i):
        try:
            barrier.wait()
            got[i] = _steps(model, streams[i], None)[0]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_four_threads_generating_with_one_charlm_match_sequential():
    torch.manual_seed(2)
    model = CharLM(ModelConfig(vocab_size=13, width=24, embedding_dim=8, depth=2)).eval()
    prefixes = [torch.tensor(p) for p in ([1, 2, 3], [4, 5], [6, 7, 8, 9], [10])]
    want = [model.generate(p, 60, temperature=0) for p in prefixes]
    got: list = [None] * 4
    barrier = threading.Barrier(4)

    def work(i):
        barrier.wait()
        got[i] = model.generate(prefixes[i], 60, temperature=0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("outer", ["identity", "tanh"])
def test_no_grad_single_step_equals_reference(depth, outer):
    """The single-step path (unprepared weights, pooled scratch) for every depth and candidate."""
    torch.manual_seed(3)
    fus = NestedLSTM(4, 6, depth=depth, candidate_activation=outer).double()
    ref = NestedLSTM(4, 6, depth=depth, candidate_activation=outer, impl="reference").double()
    with torch.no_grad():
        for p in fus.parameters():
            p.uniform_(-0.8, 0.8)
    ref.load_state_dict(fus.state_dict())
    x = torch.randn(3, 1, 4, dtype=torch.float64)
    state = (torch.randn(3, 6, dtype=torch.float64), tuple(torch.randn(3, 6, dtype=torch.float64)
                                                             for _ in range(depth)))
    with torch.no_grad():
        got, (h, cs), mems = fus(x, state, return_memories=True)
        want, (h_ref, cs_ref), mems_ref = ref(x, state, return_memories=True)
    for a, b in zip([got, h, *cs, *mems], [want, h_ref, *cs_ref, *mems_ref], strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("T", [5, 20])  # below and above MIN_PACKED_STEPS: generic and oneDNN GEMMs
def test_float32_no_grad_sequence_after_fused_adam(T):
    fus, ref = model_pair(torch.float32, input_size=12, hidden=20)
    x = torch.randn(4, T, 12)
    warm(fus, x)
    opt = torch.optim.Adam(fus.parameters(), lr=0.05, fused=True)
    train_step(fus, opt, x)
    assert_matches_reference(fus, ref, x, atol=2e-5, rtol=1e-4)
