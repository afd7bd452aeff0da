"""Train one Nested LSTM with the library alone (no Ray, no MLflow, no YAML), then sample from it.

    python examples/train_one_model.py                         # the synthetic corpus, about a minute
    python examples/train_one_model.py --corpus ptb --data-dir ../shared/data --epochs 1
"""

import argparse

from nlstm import CharLM, ModelConfig, width_for_budget
from nlstm.data import load_corpus
from nlstm.trainer import TrainConfig, Trainer

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--corpus", default="synthetic")
parser.add_argument("--data-dir")
parser.add_argument("--budget", type=float, default=50_000, help="parameters (the width is solved from it)")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--max-steps-per-epoch", type=int, default=200)
args = parser.parse_args()

corpus = load_corpus(args.corpus, data_dir=args.data_dir)
solution = width_for_budget("nlstm", depth=2, budget=args.budget, vocab_size=len(corpus.vocab), embedding_dim=32)
model = CharLM(ModelConfig(vocab_size=len(corpus.vocab), arch="nlstm", depth=2, width=solution.width,
                           embedding_dim=solution.embedding_dim))
print(f"nested LSTM, depth 2, width {solution.width}: {model.num_params():,} parameters")

config = TrainConfig(epochs=args.epochs, batch_size=32, bptt=100, lr=5e-3, max_steps_per_epoch=args.max_steps_per_epoch)
result = Trainer(model, corpus, config).fit()
for epoch in result.history:
    print(f"epoch {epoch.epoch}: train {epoch.train_bpc:.3f} / valid {epoch.valid_bpc:.3f} bpc")
print(f"test {result.test_bpc:.3f} bpc (the model with the best valid BPC)")

prefix = corpus.valid[:50]
sample = model.generate(prefix, n=200, temperature=0.8)
print("".join(corpus.vocab.decode(prefix)) + " | " + "".join(corpus.vocab.decode(sample)))
