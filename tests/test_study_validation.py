"""Study files that try to break the validator: YAML alias bombs, recursive aliases and deep
nesting (one line, fast: each hostile load runs in a subprocess whose timeout keeps a regression
from hanging the suite); strict types and finite numbers in every numeric field; budgets too
small to match every architecture within ``budget_tolerance`` (naming the smallest that does, as
a brute-force scan finds it); models that cannot fit in memory. No Ray here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_study_spec import ABLATION, BASE, REPO

from nlstm.params import width_for_budget
from study.plan import check_budgets, minimum_budget
from study.spec import MAX_YAML_VALUES, load_spec
from study.spec_errors import SpecError

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
    code = ("import sys\nfrom study.spec import load_spec\nfrom study.spec_errors import SpecError\n"
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
