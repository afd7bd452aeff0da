"""Study files that try to break the validator: YAML alias bombs, recursive aliases and deep
nesting (one line, fast: each hostile load runs in a subprocess whose timeout keeps a regression
from hanging the suite); strict types and finite numbers in every numeric field; budgets too
small to match every architecture within ``budget_tolerance`` (naming the smallest that does, as
a brute-force scan finds it); models that cannot fit in memory, counting the trials that run at
once and this process's limits (RLIMIT_AS, RLIMIT_DATA, its cgroup). Then the CLI against hostile
arguments (issue 20): names too long for the file system, an Optuna storage in a read-only folder,
an --address where something that is not Ray listens. Ray only where a test says so (a real head
in its own network namespace; ray.init against a silent port)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from test_study_spec import ABLATION, BASE, REPO

from nlstm.params import width_for_budget
from study.spec.errors import SpecError
from study.spec.load import MAX_YAML_VALUES, load_spec
from study.spec.plan import check_budgets, minimum_budget

SEARCH = ("search: {space: {arch: {type: categorical, choices: [nlstm, stacked, single], balanced: true},"
          " layers: {type: int, low: 2, high: 2, when: {arch: stacked}}}}\n")
VOCAB = 34  # the synthetic corpus's vocabulary


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _bomb(levels: int = 9, merge: bool = False) -> str:
    """Nine aliases of nine aliases ...: 10^9 values once expanded (342 bytes without merge keys)."""
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' if not merge else "a: &a {x: 1, y: 2}\n"
    names = "abcdefghijklmnop"[:levels]
    for prev, cur in zip(names, names[1:], strict=False):
        aliases = ",".join([f"*{prev}"] * 9)
        text += f"{cur}: &{cur} {{<<: [{aliases}]}}\n" if merge else f"{cur}: &{cur} [{aliases}]\n"
    return text


def load_in_subprocess(path: Path) -> str:
    """The one-line error of loading ``path``, in a child process: if a regression made the load
    exponential again, the timeout fails this test instead of hanging the suite."""
    code = ("import sys\nfrom study.spec.load import load_spec\nfrom study.spec.errors import SpecError\n"
            "try:\n    load_spec(sys.argv[1])\nexcept SpecError as e:\n    print(e)\n    sys.exit(2)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and out.stderr == "", out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    return lines[0]


# ------------------------------------------------------------------ hostile YAML
@pytest.mark.parametrize("text,expected", [
    (_bomb(), f"line 5, column 4: expected at most {MAX_YAML_VALUES:,} values once aliases are expanded"),
    (_bomb(merge=True), f"expected at most {MAX_YAML_VALUES:,} values once aliases are expanded"),
    ("a: &a [*a]\n", "line 1, column 8: expected no alias inside its own anchor (*a is recursive)"),
    ("a: &a {b: [1, {c: *a}]}\n", "expected no alias inside its own anchor (*a is recursive)"),
    ("a: " + "[" * 100_000 + "\n", "line 1, column 36: expected at most 32 levels of nesting"),
    ("".join(" " * i + f"k{i}:\n" for i in range(300)), "line 32, column 32: expected at most 32 levels of nesting"),
    ("a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 100)),
     "expected at most 32 levels of nesting once aliases are expanded"),
    ("".join(f"k{i}: {i}\n" for i in range(20_000)), f"expected at most {MAX_YAML_VALUES:,} values"),
    ("description: " + "x" * 1_000_001 + "\n", "expected at most 1,000,000 characters"),
    ("? [a, b]\n: 1\n", "line 1: expected a plain name as a key, got a list"),
    ("name: t\x00\n", "line 1, column 8: expected printable text, got the control character U+0000 (a NUL byte: "
                       "is it a binary file?)"),
    ("name: t\ndescription: \"\x1b[31m\"\n", "line 2, column 15: expected printable text, got the control "
                                              "character U+001B"),
    (BASE.replace("train_chars: 3000", "train_chars: 3000, max_word_len: 1000000") + ABLATION,
     "data.options.max_word_len: expected an integer in [1, 32], got 1,000,000"),  # sum(26**k) took forever
], ids=["billion-laughs", "merge-key-bomb", "recursive", "recursive-nested", "deep-flow", "deep-block",
        "alias-chain", "too-many-values", "too-long", "complex-key", "nul-byte", "escape-byte", "word-length"])
def test_hostile_yaml_is_one_line_and_fast(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = load_in_subprocess(path)
    assert message.startswith(f"{path}: ") and expected in message, message


def test_billion_laughs_is_342_bytes():
    assert len(_bomb()) == 342


def test_aliases_within_the_limits_still_work(tmp_path):
    spec = load_spec(write(tmp_path, BASE + "train: &short {epochs: 2, batch_size: 8}\n"
                           "search: {train: *short, space: {lr: [0.01, 0.02]}}\n"
                           "evaluate: {seeds: [1], train: {<<: *short, epochs: 4}}\n"))
    assert (spec.search.train.epochs, spec.search.train.batch_size) == (2, 8)
    assert (spec.evaluate.train.epochs, spec.evaluate.train.batch_size) == (4, 8)


# ------------------------------------------------------------------ strict types, finite numbers
STRICT = [
    (BASE + ABLATION + "train: {lr: .inf}\n", "train.lr: expected a finite number, got Infinity"),
    (BASE + ABLATION + "train: {lr: .nan}\n", "train.lr: expected a finite number, got NaN"),
    (BASE + ABLATION + "train: {batch_size: true}\n", "train.batch_size: expected an integer, got true"),
    (BASE + ABLATION + "train: {epochs: 5.0}\n", "train.epochs: expected an integer, got 5.0"),
    (BASE + ABLATION + "train: {lr: '0.1'}\n", "train.lr: expected a number, got '0.1'"),
    (BASE + ABLATION + "train: {clip: true}\n", "train.clip: expected a number, got true"),
    (BASE + ABLATION + "train: {time_budget_s: .inf}\n", "train.time_budget_s: expected a finite number"),
    (BASE + ABLATION + "model: {forget_bias: -.inf}\n", "model.forget_bias: expected a finite number"),
    (BASE + ABLATION + "resources: {cpus_per_trial: .inf}\n", "resources.cpus_per_trial: expected a finite number"),
    (BASE.replace("{corpus: synthetic,", "{corpus: synthetic, max_train_tokens: 1.0e+5,") + ABLATION,
     "data.max_train_tokens: expected an integer, got 100000.0"),
    (BASE.replace("train_chars: 3000", "train_chars: true") + ABLATION,
     "data.options.train_chars: expected an integer, got true"),
    (BASE.replace("train_chars: 3000", "open_prob: .nan") + ABLATION, "data.options.open_prob: expected a finite"),
    (BASE + "search: {space: {lr: {type: float, low: 1.0e-3, high: .inf}}}\n",
     "search.space.lr.high: expected a finite number"),
    (BASE + "search: {space: {lr: {type: float, low: 1.0e-3, high: 0.1, step: .inf}}}\n",
     "search.space.lr.step: expected a finite number"),
    (BASE + "search: {space: {depth: {type: int, low: true, high: 3}}}\n",
     "search.space.depth.low: expected an integer, got true"),
    (BASE + "search: {space: {depth: {type: int, low: 1.0, high: 3}}}\n",
     "search.space.depth.low: expected an integer, got 1.0"),
    (BASE + "search: {space: {lr: [0.1, .nan]}}\n", "search.space.lr.choices[1]: expected a finite number"),
    (BASE + "search: {space: {batch_size: [8, true]}}\n",
     "search.space.batch_size.choices[1]: expected an integer, got true"),
    (BASE + "search: {space: {lr: .inf}}\n", "search.space.lr.value: expected a finite number"),
    (BASE + "search: {sampler: {seed: 1.5}}\n", "search.sampler.seed: expected an integer, got 1.5"),
    (BASE + "search: {num_samples: true}\n", "search.num_samples: expected an integer, got true"),
    (BASE + "ablation: {factors: {lr: [0.1, .inf]}, seeds: [1]}\n", "ablation.factors.lr[1]: expected a finite"),
    (BASE + "ablation: {factors: {batch_size: [true]}, seeds: [1]}\n",
     "ablation.factors.batch_size[0]: expected an integer, got true"),
    (BASE + "ablation: {params: {epochs: 2.0}, factors: {arch: [nlstm]}, seeds: [1]}\n",
     "ablation.params.epochs: expected an integer, got 2.0"),
    (BASE + "ablation: {factors: {arch: [nlstm]}, seeds: [true]}\n", "ablation.seeds[0]: expected an integer"),
    (BASE.replace("5000", ".inf") + ABLATION, "budget.value: expected a finite number"),
    (BASE + ABLATION + "smoke: {budget: .inf}\n", "smoke.budget: expected a finite number"),
    (BASE + ABLATION + "budget_tolerance: .nan\n", "budget_tolerance: expected a finite number"),
]


@pytest.mark.parametrize("text,expected", STRICT, ids=[f"{i:02d}" for i in range(len(STRICT))])
def test_types_are_strict_and_numbers_finite(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)


def test_an_integer_is_a_valid_float(tmp_path):
    spec = load_spec(write(tmp_path, BASE + ABLATION + "train: {lr: 1, clip: 5}\nmodel: {forget_bias: 0}\n"))
    assert (spec.train.lr, spec.train.clip, spec.model.forget_bias) == (1.0, 5.0, 0.0)


# ------------------------------------------------------------------ budgets
def _last_miss(arch: str, depth: int, vocab: int, emb: int | None, tolerance: float, up_to: int) -> int:
    """Reference: the largest budget <= up_to at which width_for_budget misses (every budget tried)."""
    last = 0
    for budget in range(100, up_to + 1):
        try:
            error = abs(width_for_budget(arch, depth, budget, vocab, embedding_dim=emb).relative_error)
        except ValueError:
            error = float("inf")
        if error > tolerance:
            last = budget
    return last


@pytest.mark.parametrize("arch,depth,vocab,emb", [("nlstm", 2, 34, 8), ("stacked", 3, 50, 16), ("single", 1, 27, None),
                                                  ("nlstm", 3, 50, 128)])
def test_minimum_budget_is_where_every_larger_budget_matches(arch, depth, vocab, emb):
    found = minimum_budget(arch, depth, vocab, emb, 0.02)
    assert _last_miss(arch, depth, vocab, emb, 0.02, up_to=2 * found) == found - 1


def test_a_budget_too_small_for_the_arms_is_refused_naming_the_minimum(tmp_path):
    path = write(tmp_path, BASE.replace("5000", "100") + SEARCH)
    spec = load_spec(path)  # valid on its own: the vocabulary (from the data) decides
    with pytest.raises(SpecError) as info:
        check_budgets(spec, VOCAB, path)
    minimum = max(minimum_budget(a, d, VOCAB, 128, 0.02) for a, d in [("nlstm", 2), ("stacked", 2), ("single", 1)])
    message = str(info.value)
    assert message.startswith(f"{path}: budget: expected a budget of at least {minimum:,} parameters, from which "
                              "every architecture (nlstm-d2, stacked-d2, single-d1) is within 2% (budget_tolerance);")
    assert "off at 100" in message and "\n" not in message
    check_budgets(load_spec(write(tmp_path, BASE.replace("5000", str(minimum)) + SEARCH)), VOCAB, path)


def test_a_searched_budget_range_must_start_at_the_minimum(tmp_path):
    minimum = max(minimum_budget(a, d, VOCAB, 128, 0.02) for a, d in [("nlstm", 2), ("stacked", 2), ("single", 1)])
    low = next(b for b in range(minimum - 1, 100, -1)  # matches every arm, but some budget above it does not
               if all(abs(width_for_budget(a, d, b, VOCAB).relative_error) <= 0.02
                      for a, d in [("nlstm", 2), ("stacked", 2), ("single", 1)]))
    path = write(tmp_path, BASE.replace("5000", f"{{type: int, low: {low}, high: 50000}}") + SEARCH)
    with pytest.raises(SpecError) as info:
        check_budgets(load_spec(path), VOCAB, path)
    assert str(info.value).startswith(f"{path}: budget.low: expected a searched budget from at least {minimum:,} ")
    check_budgets(load_spec(write(tmp_path, BASE.replace("5000", f"{{type: int, low: {minimum}, high: 50000}}")
                                  + SEARCH)), VOCAB, path)


def test_ablation_budgets_are_checked_under_their_own_key(tmp_path):
    path = write(tmp_path, BASE + "ablation: {factors: {arch: [nlstm, single], budget: [20000, 150]}, seeds: [1]}\n")
    with pytest.raises(SpecError) as info:
        check_budgets(load_spec(path), VOCAB, path)
    assert str(info.value).startswith(f"{path}: ablation.factors.budget[1]: expected a budget of at least")


def test_the_tolerance_is_a_setting_outside_the_study_hash(tmp_path):
    strict = load_spec(write(tmp_path, BASE.replace("5000", "100") + SEARCH))
    loose = load_spec(write(tmp_path, BASE.replace("5000", "100") + SEARCH + "budget_tolerance: 0.5\n"))
    assert strict.budget_tolerance == 0.02 and loose.study_hash() == strict.study_hash()
    check_budgets(loose, VOCAB)  # +14/+26/+38 % is within 50 %


def test_a_budget_beyond_the_hard_cap_is_refused_when_the_file_is_read(tmp_path):
    path = write(tmp_path, BASE.replace("5000", "1.0e+15") + ABLATION)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == (f"{path}: budget: expected a parameter count <= 1,000,000,000 (larger models do not "
                               "fit in memory), got 1000000000000000.0")


def test_a_trial_that_cannot_fit_in_memory_is_refused(tmp_path):
    path = write(tmp_path, BASE.replace("5000", "500000") + ABLATION + "train: {batch_size: 1000000000}\n")
    for gpus in (0, 0.5):  # this machine's memory, or (no such GPU here) the hard cap
        with pytest.raises(SpecError) as info:
            check_budgets(load_spec(path), VOCAB, path, gpus_per_trial=gpus)
        assert str(info.value).startswith(f"{path}: budget: expected a model that fits in memory: nlstm-d2 at "
                                          "500,000 parameters needs at least ")


@pytest.mark.parametrize("text,expected", [
    (BASE.replace("5000", "100") + SEARCH, "budget: expected a budget of at least"),
    (BASE.replace("5000", "500000") + ABLATION + "train: {batch_size: 1000000000}\n",
     "expected a model that fits in memory"),
    (BASE.replace("5000", "1.0e+15") + ABLATION, "budget: expected a parameter count <= 1,000,000,000"),
    (BASE + ABLATION + "train: {lr: .inf}\n", "train.lr: expected a finite number, got Infinity"),
    (BASE.replace("name: t", "name: t\x00") + ABLATION, "line 1, column 8: expected printable text"),
])
def test_dry_run_refuses_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, text, expected):
    from study.run import main

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, text)
    assert main(["--space", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and expected in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_an_ablation_on_defaults_needs_a_budget_when_the_budget_is_searched(tmp_path):
    path = write(tmp_path, BASE.replace("5000", "[3000, 5000]") + SEARCH + ABLATION)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: ablation: expected a budget in ablation.params or ablation.factors")


def test_dry_run_of_an_ablation_on_a_searched_budget(tmp_path, monkeypatch, capsys):
    from study.run import main

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, BASE.replace("5000", "[3000, 5000]") + SEARCH.replace("}}}\n", "}}, num_samples: 1,"
                 " train: {epochs: 1, max_steps_per_epoch: 2}}\n") + ABLATION.replace("{factors", "{base: search,"
                                                                                       " factors"))
    assert main(["--space", str(path), "--dry-run"]) == 0
    assert "budget     3,000" in capsys.readouterr().out


# ------------------------------------------------------------------ memory: trials at once, process limits
def _mem_total() -> int:
    """The machine's RAM as /proc/meminfo says (an independent reading of what sysconf gives)."""
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024


def _no_process_limits() -> bool:
    from study.spec.memory import cgroup_room

    return (all(resource.getrlimit(r)[0] == resource.RLIM_INFINITY for r in (resource.RLIMIT_AS, resource.RLIMIT_DATA))
            and cgroup_room() is None)


def test_the_memory_check_counts_the_trials_that_run_at_once(tmp_path):
    if not _no_process_limits():
        pytest.skip("this process has a memory limit tighter than the machine's RAM")
    ram = _mem_total()
    budget = ram // 32  # Adam's weights, gradients and state alone: 16 bytes a parameter, half the RAM
    if budget > 1e9:
        pytest.skip("this machine has more RAM than the largest budget needs")
    path = write(tmp_path, BASE.replace("5000", str(budget)) + ABLATION)
    spec = load_spec(path)
    check_budgets(spec, VOCAB, path, gpus_per_trial=0, concurrency=1)
    with pytest.raises(SpecError) as info:
        check_budgets(spec, VOCAB, path, gpus_per_trial=0, concurrency=3)
    assert str(info.value).endswith(f"a trial has {ram // 3 / 2**30:,.1f} GiB (this machine's memory of "
                                    f"{ram / 2**30:.1f} GiB, shared by 3 trials at a time)"), str(info.value)
    check_budgets(spec, VOCAB, path, gpus_per_trial=0, concurrency=3, local=False)  # trials on other machines


@pytest.mark.parametrize("argv, at_once", [([], 8), (["--max-concurrent", "3"], 3)])
def test_the_dry_run_counts_cpus_per_trial_and_max_concurrent(tmp_path, monkeypatch, capsys, argv, at_once):
    from study.run import main

    if not _no_process_limits():
        pytest.skip("this process has a memory limit tighter than the machine's RAM")
    ram = _mem_total()
    if ram // 32 > 1e9:
        pytest.skip("this machine has more RAM than the largest budget needs")
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, BASE.replace("5000", str(ram // 32)) + ABLATION)
    cpus = (os.cpu_count() or 1) / 8  # 8 trials at a time
    assert main(["--space", str(path), "--dry-run", "--cpus-per-trial", repr(cpus), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"shared by {at_once} trials at a time)" in err[0], err


def _cli(cwd: Path, *args: str, timeout: float = 120, preexec_fn=None, wrap: tuple[str, ...] = ()
         ) -> tuple[int, str, str]:
    """Run the study CLI in its own session; a run past ``timeout`` fails the test (and is killed
    with everything it started)."""
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([*wrap, sys.executable, str(REPO / "study" / "run.py"), *args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=preexec_fn)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"still running after {timeout:.0f} s: {(out + err)[-2000:]}") from None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # a private Ray it may have started
        except (ProcessLookupError, PermissionError):
            pass
    return process.returncode, out, err


@pytest.mark.parametrize("limit, what", [(resource.RLIMIT_AS, "address-space limit (ulimit -v) of 6.0 GiB"),
                                         (resource.RLIMIT_DATA, "data-segment limit (ulimit -d) of 6.0 GiB")],
                         ids=["RLIMIT_AS", "RLIMIT_DATA"])
def test_a_dry_run_under_a_memory_limit_refuses_a_model_too_large_in_one_line(tmp_path, limit, what):
    path = write(tmp_path, BASE.replace("5000", "900000000") + ABLATION)

    def limited() -> None:
        resource.setrlimit(limit, (6 * 2**30, resource.getrlimit(limit)[1]))

    code, out, err = _cli(tmp_path, "--space", str(path), "--dry-run", preexec_fn=limited)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: {path}: budget: expected a model that fits in memory: nlstm-d2 at "
                               "900,000,000 parameters needs at least "), lines
    assert f"(this process's {what}, less the " in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


@pytest.fixture
def memory_cgroup():
    """A new memory cgroup (inside this process's) limited to 3 GiB: (folder, a preexec_fn that moves
    the child process into it). Skipped where no memory cgroup can be made here."""
    from study.spec.memory import _cgroup_dirs

    dirs = _cgroup_dirs()
    if not dirs:
        pytest.skip("no cgroup file system is readable here")
    own, version = dirs[0]
    limit_file = "memory.max" if version == "v2" else "memory.limit_in_bytes"
    folder = own / f"nlstm-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        folder.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a cgroup in {own}: {e.strerror}")
    try:
        try:
            (folder / limit_file).write_text(str(3 * 2**30))
        except OSError as e:
            pytest.skip(f"cannot limit the memory of a cgroup in {own} ({version}): {e.strerror}")

        def join() -> None:
            (folder / "cgroup.procs").write_text(str(os.getpid()))

        yield folder / limit_file, join
    finally:
        folder.rmdir()  # empty again: the CLI's process has exited


def test_a_dry_run_in_a_memory_limited_cgroup_refuses_a_model_too_large_in_one_line(tmp_path, memory_cgroup):
    limit_file, join = memory_cgroup
    path = write(tmp_path, BASE.replace("5000", "900000000") + ABLATION)
    code, out, err = _cli(tmp_path, "--space", str(path), "--dry-run", preexec_fn=join)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err[-3000:])
    assert lines[0].startswith(f"error: {path}: budget: expected a model that fits in memory: nlstm-d2 at "
                               "900,000,000 parameters needs at least "), lines
    assert f"(the memory limit of this process's cgroup ({limit_file}: 3.0 GiB, " in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


# ------------------------------------------------------------------ names too long for the file system
LONG = "x" * 300


@pytest.mark.parametrize("argv, what", [
    (["--output", "{tmp}/" + LONG], "--output"),
    (["--tracking-uri", "{tmp}/" + LONG + "/mlflow.db"], "tracking store"),
    (["--tracking-uri", "{tmp}/" + LONG + ".db"], "tracking store"),
    (["--optuna-storage", "{tmp}/" + LONG + "/optuna.log"], "--optuna-storage"),
    (["--optuna-storage", "sqlite:///{tmp}/" + LONG + ".db"], "--optuna-storage"),
    (["--storage", "{tmp}/" + LONG], "--storage"),
], ids=["output", "tracking-folder", "tracking-file", "optuna-journal", "optuna-sqlite", "storage"])
def test_a_name_too_long_for_the_file_system_is_one_line(tmp_path, monkeypatch, capsys, argv, what):
    from study.run import main

    with pytest.raises(OSError) as refused:  # the file system's own answer
        os.stat(tmp_path / LONG)
    assert refused.value.strerror == "File name too long"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write(tmp_path, BASE + ABLATION)
    size = len(LONG) + (3 if argv[1].endswith(LONG + ".db") else 0)
    assert main(["--space", str(path), *[a.format(tmp=tmp_path) for a in argv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {what}"), err
    assert err[0].endswith(f": the name 'xxxxxxxxxxxxxxxxxxxxxxxx...' in it is {size} bytes long; the file system "
                           f"allows at most {os.pathconf(tmp_path, 'PC_NAME_MAX')} (ENAMETOOLONG)"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


# ------------------------------------------------------------------ an Optuna storage that cannot be written
SMALL_SEARCH = ("train: {epochs: 1, batch_size: 8, bptt: 20, eval_batch_size: 8, max_steps_per_epoch: 2}\n"
                "search: {space: {lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}}, num_samples: 1}\n")


def _mount_namespace_problem() -> str | None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return "needs unshare and root"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    return f"unshare -m is not permitted here: {probe.stderr.strip()}" if probe.returncode else None


@pytest.mark.parametrize("storage", ["{ro}/optuna.log", "sqlite:///{ro}/optuna.db"], ids=["journal", "sqlite"])
def test_an_optuna_storage_in_a_read_only_folder_is_one_line_before_anything_is_written(tmp_path, storage):
    problem = _mount_namespace_problem()
    if problem:
        pytest.skip(problem)
    path = write(tmp_path, BASE + SMALL_SEARCH)
    ro = tmp_path / "ro"
    ro.mkdir()
    url = storage.format(ro=ro)
    mount = f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && exec \"$@\""  # root ignores file modes
    code, out, err = _cli(tmp_path, "--space", str(path), "--optuna-storage", url, timeout=300,
                          wrap=("unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, out + err[-3000:]
    assert lines[0] == f"error: --optuna-storage: folder {ro} is not writable (Read-only file system)", lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro", "study.yaml"]  # no mlflow.db, no studies/


def test_an_optuna_storage_in_a_missing_folder_is_one_line(tmp_path, monkeypatch, capsys):
    from study.run import main

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, BASE + SMALL_SEARCH)
    assert main(["--space", str(path), "--optuna-storage", f"sqlite:///{tmp_path}/missing/o.db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --optuna-storage: folder {tmp_path}/missing does not exist"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


# ------------------------------------------------------------------ an --address where Ray does not answer
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server: the study's store, and (its port) an HTTP server that is not Ray."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=folder,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers (nor reads)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.parametrize("target, answer", [("silent", "it did not answer in 5 s"),
                                            ("mlflow", "it answered b'HTTP/1.1 ")])
def test_an_address_where_something_else_listens_is_one_line_before_anything_is_written(
        tmp_path, mlflow_server, silent_port, target, answer):
    from mlflow import MlflowClient

    name = f"addr{target}"
    path = write(tmp_path, BASE.replace("name: t", f"name: {name}") + ABLATION)
    (tmp_path / "shared").mkdir()
    address = f"127.0.0.1:{silent_port}" if target == "silent" else mlflow_server.removeprefix("http://")
    code, out, err = _cli(tmp_path, "--space", str(path), "--address", address, "--tracking-uri", mlflow_server,
                          "--storage", str(tmp_path / "shared"), timeout=90)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, out + err[-3000:]
    assert lines[0].startswith(f"error: --address {address}: something listens there but it is not a Ray cluster "
                               f"(Ray's GCS answers in HTTP/2; {answer}"), lines
    assert MlflowClient(mlflow_server).get_experiment_by_name(name) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared", "study.yaml"]
    assert list((tmp_path / "shared").iterdir()) == []


@pytest.mark.slow
def test_ray_init_on_an_address_that_never_answers_gives_up_within_one_attempt(silent_port):
    """The second guard: should something pass the probe that is not Ray, ray.init(address=...)
    makes one attempt (about 40 s) instead of 20 (about 13 minutes)."""
    code = ("import argparse, sys\nfrom study.run import start_ray\n"
            "try:\n    start_ray(argparse.Namespace(address=sys.argv[1], verbose=False))\n"
            "except Exception as e:\n    print('raised', type(e).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code, f"127.0.0.1:{silent_port}"], cwd=REPO, capture_output=True,
                         text=True, timeout=150, env=os.environ | {"RAY_AUTH_MODE": "disabled"})
    assert out.stdout.strip() == "raised ConnectionError", out.stdout + out.stderr[-2000:]
    assert "RAY_gcs_server_port_wait_time_s" not in os.environ


RAY_HEAD_PROBE = """
import json, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
import cluster_harness
from study.run import check_ray_answers
cluster = cluster_harness.Cluster(Path(sys.argv[1]), {})
result = {}
try:
    cluster_harness.make_token(Path(sys.argv[1]) / "home")  # Ray's default: token authentication
    cluster.head()
    try:
        check_ray_answers(cluster_harness.RAY_ADDRESS)
        result[cluster_harness.RAY_ADDRESS] = "ok"
    except Exception as e:
        result[cluster_harness.RAY_ADDRESS] = str(e)
finally:
    cluster.close()
print("RESULT" + json.dumps(result))
"""


@pytest.mark.slow
def test_a_real_ray_head_passes_the_address_probe(tmp_path):
    """The probe against the real thing: the GCS port of a `ray start --head` (token authentication
    on, Ray's default), in a network and PID namespace of its own. (The Ray Client port, ray://,
    is a gRPC server too, but `ray start` here starts no client server to try: grpcio is not
    installed.)"""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip")
    probe = subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", "ip", "link", "set", "lo", "up"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"unshare -n -p is not permitted here: {probe.stderr.strip()}")
    out = subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", sys.executable, "-c", RAY_HEAD_PROBE,
                          str(tmp_path), str(REPO / "tests")], capture_output=True, text=True, timeout=300,
                         env=os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                       os.environ.get("PYTHONPATH")]))})
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads(line[6:]) == {"127.0.0.1:6380": "ok"}
