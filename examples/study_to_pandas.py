"""Load a study's trial runs from MLflow into pandas and plot one comparison: valid BPC per
family, one point per run. The full analysis (intervals, paired tests, figures) is
study/write_report.py; this is the starting point for your own.

    python examples/study_to_pandas.py --study smoke [--tracking-uri sqlite:///mlflow.db] [--out bpc.png]
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import mlflow  # noqa: E402
import seaborn as sns  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--study", required=True)
parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
parser.add_argument("--out", default="bpc_by_family.png")
args = parser.parse_args()

mlflow.set_tracking_uri(args.tracking_uri)
# One row per run; tags and metrics become columns (the layout: docs/mlflow-layout.md).
runs = mlflow.search_runs(experiment_names=[args.study], filter_string="tags.`nlstm.kind` = 'trial'")
runs = runs[runs["tags.nlstm.status"] == "completed"]
table = runs.rename(columns={"tags.nlstm.family": "family", "tags.nlstm.phase": "phase",
                             "metrics.best_valid_bpc": "valid_bpc", "metrics.num_params": "params"})
print(table.groupby(["phase", "family"])["valid_bpc"].agg(["count", "mean", "std"]).round(3).to_string())

ax = sns.stripplot(data=table, x="family", y="valid_bpc", hue="phase")
ax.set(ylabel="best valid BPC (lower is better)", title=f"{args.study}: one point per trial run")
ax.figure.savefig(args.out, dpi=120, bbox_inches="tight")
print(f"wrote {args.out}")
