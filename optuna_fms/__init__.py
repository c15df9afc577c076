"""optuna-fms: Forecasting Model Search, checkpoint-aware freeze-thaw HPO as an Optuna sampler and pruner."""

from optuna_fms.checkpoints import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    register_pretrained,
    save_checkpoint,
)
from optuna_fms.graphs.build import describe_architecture
from optuna_fms.lineage import CheckpointRecord, Lineage, best_lineage, lineages
from optuna_fms.pruner import FMSPruner
from optuna_fms.rng import TrialRNG
from optuna_fms.sampler import FMSSampler

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointRecord",
    "FMSPruner",
    "FMSSampler",
    "Lineage",
    "TrialRNG",
    "best_lineage",
    "lineages",
    "load_checkpoint",
    "read_checkpoint",
    "register_pretrained",
    "describe_architecture",
    "save_checkpoint",
]
