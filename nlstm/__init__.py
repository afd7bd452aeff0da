"""nlstm: Nested LSTMs (Moniz & Krueger, 2017) and their stacked / single-layer LSTM baselines.

Pure PyTorch: nothing here imports Ray, MLflow or YAML.
"""

__version__ = "0.2.0"

from nlstm.baselines import StackedLSTM
from nlstm.cell import NestedLSTMCell, nested_lstm_step
from nlstm.model import CharLM, ModelConfig
from nlstm.nested import NestedLSTM
from nlstm.params import ARCHITECTURES, BudgetSolution, core_parameters, lm_parameters, width_for_budget

__all__ = [
    "ARCHITECTURES",
    "BudgetSolution",
    "CharLM",
    "ModelConfig",
    "NestedLSTM",
    "NestedLSTMCell",
    "StackedLSTM",
    "core_parameters",
    "lm_parameters",
    "nested_lstm_step",
    "width_for_budget",
]
