"""The fused Nested LSTM (nlstm.fused) against the per-step reference, in float64, to 1e-10.

Every test here can fail: the comparisons are tight (the two implementations agree to ~1e-15 in
float64), and the benchmark smoke test checks the table's rows, not its timings.
"""

from __future__ import annotations

import ast
import copy
import gc
import importlib
import pickle
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import nlstm.fused as fused
from nlstm import CharLM, ModelConfig, NestedLSTM
from nlstm.fused import FusedNestedLSTMFunction, fused_nested_lstm
from nlstm.fused.buffers import POOL
from nlstm.fused.gemm import mkldnn_ops

ROOT = Path(__file__).resolve().parents[1]
TIGHT = dict(atol=1e-10, rtol=1e-10)
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none here)")
needs_mkldnn = pytest.mark.skipif(
    not mkldnn_ops(), reason="this torch build has no oneDNN linear ops (the generic path is tested)"
)


def pair(depth, outer="identity", batch_first=True, input_size=3, hidden=4, dtype=torch.float64, seed=0):
    """A reference and a fused model with the same (randomised, non-trivial) weights."""
    torch.manual_seed(seed)
    ref = NestedLSTM(input_size, hidden, depth=depth, batch_first=batch_first, candidate_activation=outer,
                     impl="reference").to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(-0.6, 0.6)
    fus = NestedLSTM(input_size, hidden, depth=depth, batch_first=batch_first, candidate_activation=outer,
                     impl="fused").to(dtype)
    fus.load_state_dict(ref.state_dict())
    return ref, fus


def run(model, x, state, return_memories, seed=1):
    """Outputs and the gradients of a loss that touches every output (random weights per element)."""
    result = model(x, state, return_memories=return_memories)
    out, (h, cs) = result[0], result[1]
    g = torch.Generator().manual_seed(seed)

    def w(t):
        return torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)

    loss = (out * w(out)).sum() + (h * w(h)).sum() + sum((c * w(c)).sum() for c in cs)
    outputs = [out, h, *cs]
    if return_memories:
        loss = loss + sum((m * w(m)).sum() for m in result[2])
        outputs += list(result[2])
    leaves = [x, *model.parameters()]
    if state is not None:
        leaves += [state[0], *state[1]]
    grads = torch.autograd.grad(loss, leaves)
    return outputs, grads


def make_inputs(depth, batch_first, T, B=3, input_size=3, hidden=4, with_state=True, dtype=torch.float64,
                device="cpu"):
    shape = (B, T, input_size) if batch_first else (T, B, input_size)
    x = torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)
    if not with_state:
        return x, None
    h0 = torch.randn(B, hidden, dtype=dtype, device=device, requires_grad=True)
    cs = tuple(torch.randn(B, hidden, dtype=dtype, device=device, requires_grad=True) for _ in range(depth))
    return x, (h0, cs)


def assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("outer", ["identity", "tanh"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("return_memories", [False, True])
def test_fused_equals_reference_float64(depth, outer, batch_first, with_state, T, return_memories, fused_loops):
    ref, fus = pair(depth, outer, batch_first)
    x, state = make_inputs(depth, batch_first, T, with_state=with_state)
    want_out, want_grads = run(ref, x, state, return_memories)
    got_out, got_grads = run(fus, x, state, return_memories)
    assert_all_close(got_out, want_out, **TIGHT)
    assert_all_close(got_grads, want_grads, **TIGHT)
    fused_loops.assert_used()


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("outer_identity", [True, False])
def test_gradcheck_autograd_function(depth, outer_identity, fused_loops):
    torch.manual_seed(2)
    T, B, m, n = 3, 2, 3, 2
    x = torch.randn(T, B, m, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, n, dtype=torch.float64, requires_grad=True)
    cs = [torch.randn(B, n, dtype=torch.float64, requires_grad=True) for _ in range(depth)]
    w_ih = [(torch.rand(4 * n, m if k == 0 else n, dtype=torch.float64) - 0.5).requires_grad_() for k in range(depth)]
    w_hh = [(torch.rand(4 * n, n, dtype=torch.float64) - 0.5).requires_grad_() for _ in range(depth)]
    b = [(torch.rand(4 * n, dtype=torch.float64) - 0.5).requires_grad_() for _ in range(depth)]

    def fn(*tensors):  # every output, memories included, so every backward input is exercised
        return FusedNestedLSTMFunction.apply(depth, outer_identity, True, *tensors)

    assert torch.autograd.gradcheck(fn, (x, h0, *cs, *w_ih, *w_hh, *b), eps=1e-6, atol=1e-7)
    fused_loops.assert_used()


@needs_mkldnn
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_float32_onednn_path_matches_reference_and_generic_path(depth, monkeypatch):
    ref, fus = pair(depth, dtype=torch.float32, input_size=24, hidden=40)
    x, state = make_inputs(depth, True, 9, B=5, input_size=24, hidden=40, dtype=torch.float32)
    assert fused.gemm_backend(x) == "mkldnn"
    got_out, got_grads = run(fus, x, state, True)
    want_out, want_grads = run(ref, x, state, True)
    assert_all_close(got_out, want_out, atol=2e-5, rtol=1e-4)
    assert_all_close(got_grads, want_grads, atol=1e-4, rtol=1e-4)
    monkeypatch.setenv("NLSTM_FUSED_GEMM", "generic")
    assert fused.gemm_backend(x) == "generic"
    gen_out, gen_grads = run(fus, x, state, True)
    assert_all_close(got_out, gen_out, atol=2e-5, rtol=1e-4)
    assert_all_close(got_grads, gen_grads, atol=1e-4, rtol=1e-4)


def test_bad_backend_setting_is_rejected(monkeypatch):
    monkeypatch.setenv("NLSTM_FUSED_GEMM", "cublas-magic")
    with pytest.raises(ValueError, match="NLSTM_FUSED_GEMM"):
        fused.gemm_backend(torch.zeros(1))


def test_carried_state_gradients_equal_one_pass():
    """Truncated BPTT without detaching: gradients flow through the carried state (h_T, c_T)."""
    ref, fus = pair(2, hidden=5)
    x = torch.randn(2, 10, 3, dtype=torch.float64, requires_grad=True)
    for model in (fus,):
        full, _ = model(x)
        g_full = torch.autograd.grad(full.square().sum(), [x, *model.parameters()])
        first, state = model(x[:, :4])
        second, _ = model(x[:, 4:], state)
        out = torch.cat([first, second], 1)
        torch.testing.assert_close(out, full, **TIGHT)
        g_chunks = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
        assert_all_close(g_chunks, g_full, **TIGHT)
    want, _ = ref(x)
    torch.testing.assert_close(full, want, **TIGHT)


def test_no_grad_path_equals_grad_path_and_memories():
    _, fus = pair(3, hidden=6)
    x, state = make_inputs(3, True, 7, hidden=6)
    out, (h, cs), mems = fus(x, state, return_memories=True)
    with torch.no_grad():
        out2, (h2, cs2), mems2 = fus(x, state, return_memories=True)
        out3, (h3, cs3) = fus(x[:, :1], state)  # a single step: the unprepared-weights path
    assert_all_close([out2, h2, *cs2, *mems2], [out, h, *cs, *mems], **TIGHT)
    torch.testing.assert_close(out3[:, 0], out[:, 0], **TIGHT)
    for level in range(3):
        torch.testing.assert_close(mems[level][:, -1], cs[level], **TIGHT)
        torch.testing.assert_close(cs3[level], mems[level][:, 0], **TIGHT)
    assert not out2.requires_grad and out.requires_grad


def test_one_step_generation_allocates_only_its_outputs():
    # Earlier tests' garbage (graphs holding buffer leases) must not be collected in the profiled
    # window: giving their buffers back can evict the step's scratch from the pool (LRU of 4 shapes).
    gc.collect()
    model = NestedLSTM(8, 16, depth=2).eval()
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        out, state = model(x)
        out, state = model(x, state)  # the pool now holds the step's scratch
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out, state = model(x, state)
    allocated = sum(
        e.cpu_memory_usage for e in prof.events()
        if e.name in ("aten::empty", "aten::empty_strided") and e.cpu_memory_usage > 0
    )
    outputs = sum(t.numel() * t.element_size() for t in (out, *state[1]))  # h is a view of out
    assert allocated == outputs


def test_no_grad_calls_see_weight_updates_and_copies_work():
    torch.manual_seed(3)
    model = NestedLSTM(4, 6, depth=2)
    x = torch.randn(2, 1, 4)
    with torch.no_grad():
        before = model(x)[0]
        model.bias_l1.add_(0.5)  # in place: bumps the version counter
        after = model(x)[0]
        fresh = NestedLSTM(4, 6, depth=2, impl="reference")
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(after, fresh(x)[0])
    assert not torch.allclose(before, after)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(x)[0], after)
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(restored(x)[0], after)


def test_output_modified_in_place_is_caught():
    _, fus = pair(2)
    x, state = make_inputs(2, True, 4)
    out, _ = fus(x, state)
    out.mul_(2)  # out was saved for the backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_autocast_runs_the_core_in_float32():
    torch.manual_seed(4)
    model = NestedLSTM(8, 12, depth=2)
    x = torch.randn(3, 5, 8)
    want, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, (h, cs) = model(x.bfloat16())
    assert got.dtype == torch.float32 and all(c.dtype == torch.float32 for c in cs)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=0)  # only the input was rounded to bf16


def test_bad_inputs_are_rejected():
    w_ih, w_hh, b = [torch.zeros(8, 3)], [torch.zeros(8, 2)], [torch.zeros(8)]
    state = (torch.zeros(4, 2), (torch.zeros(4, 2),))
    with pytest.raises(ValueError, match="empty"):
        fused_nested_lstm(torch.zeros(0, 4, 3), state, w_ih, w_hh, b)
    with pytest.raises(TypeError, match="one dtype"):
        fused_nested_lstm(torch.zeros(2, 4, 3, dtype=torch.float64), state, w_ih, w_hh, b)
    with pytest.raises(ValueError, match="memories"):
        fused_nested_lstm(torch.zeros(2, 4, 3), (state[0], ()), w_ih, w_hh, b)


@pytest.mark.parametrize("embedding_dim", [None, 6])
def test_charlm_fused_and_reference_train_alike(embedding_dim):
    """Same seed, same data: the loss curves of a few Adam steps agree to float32 precision."""
    curves = {}
    for impl in ("reference", "fused"):
        torch.manual_seed(5)
        model = CharLM(ModelConfig(vocab_size=11, arch="nlstm", depth=2, width=24, embedding_dim=embedding_dim,
                                   dropout=0.1, impl=impl))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        tokens = torch.randint(0, 11, (4, 13), generator=torch.Generator().manual_seed(6))
        state, losses = None, []
        for _ in range(6):  # the same batch again and again, carrying the (detached) state
            logits, state = model(tokens[:, :-1], state)
            state = (state[0].detach(), tuple(c.detach() for c in state[1]))
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[impl] = losses
    assert curves["fused"][-1] < curves["fused"][0]
    torch.testing.assert_close(torch.tensor(curves["fused"]), torch.tensor(curves["reference"]), atol=1e-5, rtol=1e-5)


def test_generate_is_reproducible_and_matches_reference():
    torch.manual_seed(7)
    fus = CharLM(ModelConfig(vocab_size=9, width=8, embedding_dim=6, impl="fused"))
    ref = CharLM(ModelConfig(vocab_size=9, width=8, embedding_dim=6, impl="reference"))
    ref.load_state_dict(fus.state_dict())
    prefix = torch.tensor([1, 2, 3])
    a = fus.generate(prefix, 12, generator=torch.Generator().manual_seed(0))
    b = ref.generate(prefix, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_retained_graph_after_buffer_reuse_raises():
    """Pooled buffers: a second backward of a retained graph is fine until a later call reuses them."""
    _, fus = pair(2)
    x, state = make_inputs(2, True, 5)
    out, _ = fus(x, state)
    g1 = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]  # no call in between: still valid
    torch.testing.assert_close(g1, g2, **TIGHT)
    fus(x, state)  # same shape: takes the pooled buffers back
    with pytest.raises(RuntimeError, match="reused"):
        torch.autograd.grad(out.sum(), x)


def test_buffer_pool_stays_bounded():
    fused.empty_cache()
    _, fus = pair(2)
    for T in range(1, 8):  # seven shapes, training and inference
        x, state = make_inputs(2, True, T)
        out, _ = fus(x, state)
        out.sum().backward()
        with torch.no_grad():
            fus(torch.randn(3, T + 1, 3, dtype=torch.float64))
    pool = POOL
    assert len(pool.free) <= pool.max_keys
    assert all(len(items) <= pool.max_free for items in pool.free.values())
    fused.empty_cache()
    assert not pool.free


def test_fused_cuda_builds_on_public_kernel_names_only():
    """nlstm.fused_cuda (GPU only, but importable anywhere) takes from the kernel's modules only
    names they list in ``__all__``, and every name listed there and in its own ``__all__`` exists:
    a kernel refactor that renames what the CUDA path uses fails here, on a CPU."""
    from nlstm import fused_cuda

    tree = ast.parse(Path(fused_cuda.__file__).read_text())
    imported = [(node.module, alias.name) for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nlstm.fused")
                for alias in node.names]
    assert len(imported) >= 10
    for module, name in imported:
        assert not name.startswith("_"), f"{module}.{name} is private"
        assert name in importlib.import_module(module).__all__, f"{name} is not in {module}.__all__"
    kernel_modules = [importlib.import_module(f"nlstm.fused.{m.name}") for m in pkgutil.iter_modules(fused.__path__)]
    for mod in [fused, fused_cuda, *kernel_modules]:
        missing = [name for name in mod.__all__ if not hasattr(mod, name)]
        assert not missing, f"{mod.__name__}.__all__ names {missing}"


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: replay() re-runs the captured function on the
    same static buffers, which is what a replay does on a GPU."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


@pytest.fixture
def fake_graphs(monkeypatch):
    from nlstm import fused_cuda

    monkeypatch.setattr(fused_cuda._Runner, "_capture", lambda self, fn: _FakeGraph(fn))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setenv("NLSTM_CUDA_GRAPHS", "1")
    fused_cuda.clear_graphs()
    yield fused_cuda
    fused_cuda.clear_graphs()


def graphed(model, x, state, return_memories=True):
    """The NestedLSTM forward, but through the graphed Function (time-major x)."""
    from nlstm import fused_cuda

    res = fused_cuda.apply(model.depth, model.candidate_activation == "identity", return_memories,
                           (x, state[0], *state[1], *model.weights_ih, *model.weights_hh, *model.biases))
    return res


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_graph_runner_logic_with_fake_graphs(depth, fake_graphs):
    """The static-buffer bookkeeping of nlstm.fused_cuda, exercised on CPU: copies in and out,
    replays, eviction when two forwards share a runner, and the retained-graph check."""
    ref, fus = pair(depth, batch_first=False, hidden=5)
    x, state = make_inputs(depth, False, 6, hidden=5)
    leaves = [x, state[0], *state[1], *fus.parameters()]

    def loss_of(res):
        g = torch.Generator().manual_seed(9)
        return sum((r * torch.randn(r.shape, generator=g, dtype=r.dtype)).sum() for r in res)

    want_res = ref(x, state, return_memories=True)
    want_flat = [want_res[0], want_res[1][0], *want_res[1][1], *want_res[2]]
    want = torch.autograd.grad(loss_of(want_flat), [x, state[0], *state[1], *ref.parameters()])
    for _ in range(3):  # capture, then replays
        res = graphed(fus, x, state)
        assert_all_close(res, want_flat, **TIGHT)
        assert_all_close(torch.autograd.grad(loss_of(res), leaves), want, **TIGHT)
    assert fake_graphs.graph_cache_size() == 1
    # Two forwards before their backwards: the first one's activations are evicted and its
    # backward runs eagerly from the copy; both orders give the right gradients.
    for first_back in (0, 1):
        a, b = graphed(fus, x, state), graphed(fus, x, state)
        order = [a, b] if first_back == 0 else [b, a]
        for res in order:
            assert_all_close(torch.autograd.grad(loss_of(res), leaves), want, **TIGHT)
    res = graphed(fus, x, state)
    torch.autograd.grad(loss_of(res), leaves, retain_graph=True)
    graphed(fus, x, state)
    with pytest.raises(RuntimeError, match="reused"):
        torch.autograd.grad(loss_of(res), leaves)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cuda_agrees_with_cpu_float64(depth):
    _, fus = pair(depth, hidden=6)
    x, state = make_inputs(depth, True, 8, hidden=6)
    want_out, want_grads = run(fus, x, state, True)
    fus_cuda = copy.deepcopy(fus).cuda()
    xc = x.detach().cuda().requires_grad_()
    sc = (state[0].detach().cuda().requires_grad_(), tuple(c.detach().cuda().requires_grad_() for c in state[1]))
    got_out, got_grads = run(fus_cuda, xc, sc, True)
    assert_all_close([t.cpu() for t in got_out], want_out, **TIGHT)
    assert_all_close([t.cpu() for t in got_grads], want_grads, **TIGHT)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("depth", [1, 2])
def test_cuda_graphs_equal_eager(depth, monkeypatch):
    from nlstm import fused_cuda

    _, fus = pair(depth, hidden=16, input_size=8, dtype=torch.float32)
    fus = fus.cuda()
    x, state = make_inputs(depth, True, 12, B=4, input_size=8, hidden=16, dtype=torch.float32, device="cuda")
    monkeypatch.setenv("NLSTM_CUDA_GRAPHS", "0")
    want_out, want_grads = run(fus, x, state, True)
    monkeypatch.setenv("NLSTM_CUDA_GRAPHS", "1")
    for _ in range(3):  # capture, then replays
        got_out, got_grads = run(fus, x, state, True)
        assert_all_close(got_out, want_out, atol=1e-6, rtol=1e-5)
        assert_all_close(got_grads, want_grads, atol=1e-5, rtol=1e-5)
    assert fused_cuda.graph_cache_size() >= 1


def test_benchmark_quick_smoke():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "B=4, T=8, H=16" in text and "torch threads" in text and "torch 2." in text
    assert "ISA: " in text and "Trained vs fresh weights, 1 thread" in text
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| model", "| target"))]
    names = [line.split("|")[1].strip() for line in rows]
    assert names == ["nlstm fused", "nlstm reference", "torch LSTM x2", "torch LSTM x1 (matched)",
                     "nlstm fused, trained", "nlstm fused, trained, flush off", "torch LSTM x2, trained",
                     "nlstm fused, fresh", "torch LSTM x2, fresh", "training on trained weights"]
    assert rows[6].split("|")[5].strip() == "1.00x" and rows[8].split("|")[5].strip() == "1.00x"
    lstm_row = rows[2].split("|")
    assert lstm_row[5].strip() == "1.00x"  # the baseline's own ratio
    for row in rows[:-1]:
        assert float(row.split("|")[4].replace(",", "")) > 0  # train tokens/s
    assert rows[-1].split("|")[5].strip() == ">= 0.8x"  # the targets table
