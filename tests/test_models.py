"""The recurrent cores against independent references: torch.nn.LSTM and hand-written equations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nlstm import CharLM, ModelConfig, NestedLSTM, NestedLSTMCell, StackedLSTM

IMPLS = ["reference", "fused"]


def sig(x):
    return torch.sigmoid(x)


def copy_level_from_lstm(dst: NestedLSTM, lstm: nn.LSTM) -> None:
    """Level 0 of ``dst`` takes the weights of a 1-layer torch LSTM (its two biases summed)."""
    with torch.no_grad():
        dst.weight_ih_l0.copy_(lstm.weight_ih_l0)
        dst.weight_hh_l0.copy_(lstm.weight_hh_l0)
        dst.bias_l0.copy_(lstm.bias_ih_l0 + lstm.bias_hh_l0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_depth1_nested_equals_torch_lstm(impl, batch_first):
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7, batch_first=batch_first)
    nested = NestedLSTM(5, 7, depth=1, batch_first=batch_first, impl=impl)
    copy_level_from_lstm(nested, lstm)
    x = torch.randn(3, 11, 5) if batch_first else torch.randn(11, 3, 5)
    h0, c0 = torch.randn(1, 3, 7), torch.randn(1, 3, 7)
    ref_out, (ref_h, ref_c) = lstm(x, (h0, c0))
    out, (h, (c,)) = nested(x, (h0[0], (c0[0],)))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, ref_h[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, ref_c[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_stacked_equals_torch_lstm(layers):
    torch.manual_seed(1)
    ref = nn.LSTM(4, 6, num_layers=layers, batch_first=True)
    stacked = StackedLSTM(4, 6, num_layers=layers)
    with torch.no_grad():
        for k in range(layers):
            getattr(stacked.lstm, f"weight_ih_l{k}").copy_(getattr(ref, f"weight_ih_l{k}"))
            getattr(stacked.lstm, f"weight_hh_l{k}").copy_(getattr(ref, f"weight_hh_l{k}"))
            getattr(stacked.lstm, f"bias_ih_l{k}").copy_(getattr(ref, f"bias_ih_l{k}") + getattr(ref, f"bias_hh_l{k}"))
    x = torch.randn(2, 9, 4)
    state = (torch.randn(layers, 2, 6), torch.randn(layers, 2, 6))
    ref_out, (ref_h, ref_c) = ref(x, state)
    out, (h, c) = stacked(x, state)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, ref_c, atol=1e-5, rtol=1e-5)
    # one trainable bias per layer: the constant b_hh is not a parameter
    assert sum(p.numel() for p in stacked.parameters()) == sum(p.numel() for p in ref.parameters()) - layers * 24


def gates(u, r, w_ih, w_hh, b):
    return (u @ w_ih.t() + r @ w_hh.t() + b).chunk(4, -1)


def depth2_by_hand(x, h, c0, c1, p, outer_tanh=False):
    """The spec's equations for D = 2, written out without loops."""
    i0, f0, g0, o0 = gates(x, h, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_l0"])
    i0, f0, o0 = sig(i0), sig(f0), sig(o0)
    g0 = torch.tanh(g0) if outer_tanh else g0
    u1, r1 = i0 * g0, f0 * c0
    i1, f1, g1, o1 = gates(u1, r1, p["weight_ih_l1"], p["weight_hh_l1"], p["bias_l1"])
    i1, f1, g1, o1 = sig(i1), sig(f1), torch.tanh(g1), sig(o1)
    c1_new = f1 * c1 + i1 * g1
    h1 = o1 * torch.tanh(c1_new)
    c0_new = h1
    h0 = o0 * torch.tanh(c0_new)
    return h0, c0_new, c1_new


def depth3_by_hand(x, h, c0, c1, c2, p):
    i0, f0, g0, o0 = gates(x, h, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_l0"])
    i0, f0, o0 = sig(i0), sig(f0), sig(o0)
    i1, f1, g1, o1 = gates(i0 * g0, f0 * c0, p["weight_ih_l1"], p["weight_hh_l1"], p["bias_l1"])
    i1, f1, g1, o1 = sig(i1), sig(f1), torch.tanh(g1), sig(o1)
    i2, f2, g2, o2 = gates(i1 * g1, f1 * c1, p["weight_ih_l2"], p["weight_hh_l2"], p["bias_l2"])
    i2, f2, g2, o2 = sig(i2), sig(f2), torch.tanh(g2), sig(o2)
    c2_new = f2 * c2 + i2 * g2
    c1_new = o2 * torch.tanh(c2_new)  # = h^2
    c0_new = o1 * torch.tanh(c1_new)  # = h^1
    return o0 * torch.tanh(c0_new), c0_new, c1_new, c2_new


def randomize(module: nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
    return dict(module.named_parameters())


@pytest.mark.parametrize("outer", ["identity", "tanh"])
def test_depth2_cell_matches_equations(outer):
    torch.manual_seed(2)
    cell = NestedLSTMCell(3, 5, depth=2, candidate_activation=outer)
    p = randomize(cell)
    x, h, c0, c1 = torch.randn(4, 3), torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    out, (h_new, (c0_new, c1_new)) = cell(x, (h, (c0, c1)))
    ref = depth2_by_hand(x, h, c0, c1, p, outer_tanh=outer == "tanh")
    for got, want in zip((out, c0_new, c1_new), ref, strict=True):
        torch.testing.assert_close(got, want)
    assert out is h_new


@pytest.mark.parametrize("impl", IMPLS)
def test_depth3_sequence_matches_equations(impl):
    torch.manual_seed(3)
    model = NestedLSTM(3, 4, depth=3, impl=impl)
    p = randomize(model)
    x = torch.randn(2, 6, 3)
    state = (torch.randn(2, 4), tuple(torch.randn(2, 4) for _ in range(3)))
    out, (h, cs), memories = model(x, state, return_memories=True)
    hh, (c0, c1, c2) = state[0], state[1]
    for t in range(6):
        hh, c0, c1, c2 = depth3_by_hand(x[:, t], hh, c0, c1, c2, p)
        torch.testing.assert_close(out[:, t], hh)
        for level, c in enumerate((c0, c1, c2)):
            torch.testing.assert_close(memories[level][:, t], c)
    torch.testing.assert_close(h, hh)
    for got, want in zip(cs, (c0, c1, c2), strict=True):
        torch.testing.assert_close(got, want)


def test_nested_depth2_differs_from_stacked_at_same_weights():
    """Guards against a 'nested' cell that silently computes a stacked LSTM."""
    torch.manual_seed(4)
    nested = NestedLSTM(3, 4, depth=2, impl="reference")
    stacked = StackedLSTM(3, 4, num_layers=2)
    with torch.no_grad():
        for a, b in zip(nested.weights_ih + nested.weights_hh + nested.biases,
                        stacked.weights_ih + stacked.weights_hh + stacked.biases, strict=True):
            b.copy_(a)
    x = torch.randn(2, 5, 3)
    assert not torch.allclose(nested(x)[0], stacked(x)[0], atol=1e-3)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_gradcheck_reference_float64(depth):
    torch.manual_seed(5)
    model = NestedLSTM(3, 3, depth=depth, impl="reference").double()
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    cs = tuple(torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(depth))
    names = [name for name, _ in model.named_parameters()]

    def fn(x, h0, *rest):
        cs, weights = rest[:depth], rest[depth:]
        out, (h, c) = torch.func.functional_call(model, dict(zip(names, weights, strict=True)), (x, (h0, cs)))
        return out, h, *c

    inputs = (x, h0, *cs, *(p.detach().clone().requires_grad_(True) for p in model.parameters()))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("arch,depth", [("nlstm", 2), ("nlstm", 3), ("stacked", 2), ("single", 1)])
def test_two_chunks_with_carried_state_equal_one_pass(arch, depth):
    torch.manual_seed(6)
    model = CharLM(ModelConfig(vocab_size=11, arch=arch, depth=depth, width=8, embedding_dim=5, impl="reference"))
    tokens = torch.randint(0, 11, (3, 20))
    full, full_state = model(tokens)
    first, state = model(tokens[:, :7])
    second, state = model(tokens[:, 7:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), full)
    for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(full_state), strict=True):
        torch.testing.assert_close(a, b)


def test_stacked_memories_are_each_layers_cell_state():
    torch.manual_seed(7)
    model = StackedLSTM(3, 4, num_layers=2)
    x = torch.randn(2, 5, 3)
    out, (h, c), memories = model(x, return_memories=True)
    torch.testing.assert_close(out, model(x)[0])
    assert len(memories) == 2 and memories[0].shape == (2, 5, 4)
    for layer in range(2):
        torch.testing.assert_close(memories[layer][:, -1], c[layer])
    _, (_, c_prefix) = model(x[:, :3])
    torch.testing.assert_close(memories[1][:, 2], c_prefix[1])


@pytest.mark.parametrize("embedding_dim", [None, 6])
def test_charlm_generate(embedding_dim):
    torch.manual_seed(8)
    model = CharLM(ModelConfig(vocab_size=9, width=8, embedding_dim=embedding_dim, impl="reference", dropout=0.2))
    prefix = torch.tensor([1, 2, 3])
    a = model.generate(prefix, 12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = model.generate(prefix, 12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert a.shape == (12,) and torch.equal(a, b) and int(a.max()) < 9
    greedy = model.generate(prefix, 4, temperature=0)
    model.eval()
    logits, state = model(prefix.unsqueeze(0))
    assert int(greedy[0]) == int(logits[0, -1].argmax())
    assert model.training is False  # restored to the mode it was in
    with pytest.raises(ValueError, match="prefix"):
        model.generate(torch.tensor([], dtype=torch.long), 3)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(vocab_size=5, arch="gru")
    with pytest.raises(ValueError, match="single"):
        ModelConfig(vocab_size=5, arch="single", depth=2)
    with pytest.raises(ValueError, match="candidate_activation"):
        NestedLSTMCell(3, 4, candidate_activation="relu")
    with pytest.raises(ValueError, match="impl"):
        NestedLSTM(3, 4, impl="cuda-magic")
