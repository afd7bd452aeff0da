"""``--smoke``: the same study (its phases and grid) shrunk as its ``smoke`` section says, to check
it end to end in minutes."""

from __future__ import annotations

from typing import Any

from study.spec.load import validate_spec
from study.spec.schema import StudySpec


def shrink_for_smoke(spec: StudySpec) -> StudySpec:
    """The same study, shrunk as its ``smoke`` section says, under the name ``<name>-smoke``."""
    s = spec.smoke
    data = spec.model_dump(mode="json", exclude_unset=False)
    data["name"] = f"{spec.name}-smoke"
    d = data["data"]
    d["max_train_tokens"] = min(d["max_train_tokens"] or s.max_train_tokens, s.max_train_tokens)
    d["max_eval_tokens"] = min(d["max_eval_tokens"] or s.max_eval_tokens, s.max_eval_tokens)
    data["model"] |= s.model.model_dump(exclude_unset=True)
    overrides = s.train.model_dump(exclude_unset=True)

    def shrink_train(train: dict[str, Any]) -> dict[str, Any]:
        train = train | overrides
        train["epochs"] = min(train["epochs"], s.epochs)
        if s.max_steps_per_epoch is not None:
            train["max_steps_per_epoch"] = min(train["max_steps_per_epoch"] or s.max_steps_per_epoch,
                                               s.max_steps_per_epoch)
        return train

    data["train"] = shrink_train(data["train"])
    if s.budget is not None:
        data["budget"] = {"type": "fixed", "value": s.budget}
    if data.get("search"):
        data["search"]["train"] = shrink_train(data["search"]["train"])
        if data["search"].get("families"):  # every family keeps its place, with a smaller budget each
            data["search"]["trials_per_family"] = min(data["search"]["trials_per_family"], s.num_samples)
        else:
            data["search"]["num_samples"] = min(data["search"]["num_samples"] or s.num_samples, s.num_samples)
        data["search"]["scheduler"]["grace_period"] = 1
    if data.get("evaluate"):
        data["evaluate"]["train"] = shrink_train(data["evaluate"]["train"])
        data["evaluate"]["top_k"] = min(data["evaluate"]["top_k"], s.top_k)
        data["evaluate"]["seeds"] = data["evaluate"]["seeds"][: s.seeds]
    if data.get("ablation"):
        ab = data["ablation"]
        ab["train"] = shrink_train(ab["train"])
        ab["seeds"] = ab["seeds"][: s.seeds]
        if s.budget is not None:
            ab["params"].pop("budget", None)
            if "budget" in ab["factors"]:
                ab["factors"]["budget"] = [s.budget]
    return validate_spec(data, f"{spec.name} (--smoke)")
