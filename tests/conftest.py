"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

# Everything but the kernel tests runs the fused kernel's Python loops: the C++ loops are built on a
# process's first call (15-60 s on 2 cores), and the study and cluster tests start fresh worker
# processes and nodes (the cluster's worker cannot see the checkout's build cache) whose first call
# would build them again. The C++ loops are bound by tests/test_fused_cpp.py and the `fused_loops`
# fixture below, which set NLSTM_CPP themselves.
os.environ.setdefault("NLSTM_CPP", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the whole test session (starting one costs ~4 s)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


class FusedLoops:
    """Which time loops the fused kernel's calls ran, recorded by spying on its path choice."""

    def __init__(self, path: str) -> None:
        self.path, self.choices = path, []

    def assert_used(self) -> None:
        """Every call of the test ran the loops asked for (and there was at least one)."""
        assert self.choices, "no fused whole-sequence call was made"
        want = self.path == "cpp"
        assert all(c == want for c in self.choices), f"asked for {self.path}, ran C++: {self.choices}"


def cpp_compiler() -> str | None:
    """The C++ compiler torch.utils.cpp_extension would use, or None (the C++ tests then skip)."""
    import shutil

    return shutil.which(os.environ.get("CXX", "c++"))


@pytest.fixture(params=["python", "cpp"])
def fused_loops(request, monkeypatch):
    """Run the test once on the Python loops (``NLSTM_CPP=0``) and once on the C++ loops
    (``NLSTM_CPP=1``; skipped without a C++ compiler, failed if the build fails)."""
    from nlstm.fused import cpp, function, inference

    loops = FusedLoops(request.param)
    if request.param == "cpp":
        if cpp_compiler() is None:
            pytest.skip("no C++ compiler: the C++ loops cannot be built here")
        assert cpp.kernels() is not None, f"the C++ loops failed to build: {cpp.build_failure()}"
    monkeypatch.setenv("NLSTM_CPP", "1" if request.param == "cpp" else "0")

    def spy(x):
        ops = cpp.use_cpp(x)
        loops.choices.append(ops is not None)
        return ops

    monkeypatch.setattr(function, "use_cpp", spy)
    monkeypatch.setattr(inference, "use_cpp", spy)
    return loops
