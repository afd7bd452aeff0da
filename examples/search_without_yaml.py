"""A Ray Tune search over the library, sampled by Optuna, without the study layer: nested vs
stacked at an equal parameter budget, the learning rate searched, ASHA stopping poor trials.
The study layer (study/run.py) adds MLflow records, resuming, phases and reports on top of this.

    python examples/search_without_yaml.py --samples 8 --epochs 3 [--storage DIR]

Tune's trial state goes to --storage, by default a temporary folder deleted at the end (Tune's own
default is ~/ray_results); the private local Ray runs without token authentication, as
study/run.py's does (Ray 2.60's default would write ~/.ray/auth_token).
"""

import argparse
import os
import tempfile
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from nlstm import CharLM, ModelConfig, width_for_budget
from nlstm.data import load_corpus
from nlstm.trainer import TrainConfig, Trainer

BUDGET = 20_000


def space(trial: optuna.Trial) -> None:
    arch = trial.suggest_categorical("arch", ["nlstm", "stacked"])  # define-by-run: conditions are plain ifs
    trial.suggest_int("depth", 2, 3) if arch == "nlstm" else trial.suggest_int("layers", 2, 3)
    trial.suggest_float("lr", 1e-3, 3e-2, log=True)


def train(config: dict, epochs: int, steps: int) -> None:
    corpus = load_corpus("synthetic", train_chars=40_000, valid_chars=4_000, test_chars=4_000)
    depth = config.get("depth") or config["layers"]
    sol = width_for_budget(config["arch"], depth, BUDGET, len(corpus.vocab), embedding_dim=16)
    model = CharLM(ModelConfig(len(corpus.vocab), config["arch"], depth, sol.width, sol.embedding_dim))

    class ReportEachEpoch:  # the trainer knows nothing of Ray: it calls back after each epoch
        def on_epoch_end(self, trainer: Trainer, epoch) -> None:
            tune.report({"valid_bpc": epoch.valid_bpc, "params": model.num_params()})

    cfg = TrainConfig(epochs=epochs, batch_size=16, bptt=50, lr=config["lr"], max_steps_per_epoch=steps)
    Trainer(model, corpus, cfg, callbacks=[ReportEachEpoch()]).fit()


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--samples", type=int, default=8)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--steps", type=int, default=50, help="training steps per epoch")
parser.add_argument("--storage", type=Path, help="folder for Tune's trial state (default: a temporary one)")
args = parser.parse_args()

temporary = None if args.storage else tempfile.TemporaryDirectory(prefix="search-without-yaml-")
storage = (args.storage or Path(temporary.name)).resolve()  # Tune needs an absolute path
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray (address="local") needs no token
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
tuner = tune.Tuner(
    tune.with_resources(tune.with_parameters(train, epochs=args.epochs, steps=args.steps), {"cpu": 1}),
    tune_config=tune.TuneConfig(metric="valid_bpc", mode="min", num_samples=args.samples, reuse_actors=True,
                                search_alg=OptunaSearch(space, metric="valid_bpc", mode="min",
                                                        sampler=optuna.samplers.TPESampler(seed=0)),
                                scheduler=ASHAScheduler(max_t=args.epochs, grace_period=1)),
    run_config=tune.RunConfig(storage_path=str(storage), verbose=0),
)
results = tuner.fit()
table = results.get_dataframe().filter(regex="^config/|^valid_bpc$|^params$")  # depth/layers: only where sampled
print(table.sort_values("valid_bpc").to_string(index=False))
print("best:", results.get_best_result().config)
ray.shutdown()
if temporary is not None:
    temporary.cleanup()
