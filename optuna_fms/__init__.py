"""optuna-fms: Forecasting Model Search, checkpoint-aware freeze-thaw HPO as an Optuna sampler and pruner."""

from optuna_fms._retry import StorageUnavailable
from optuna_fms.checkpoints import (
    Checkpoint,
    CheckpointError,
    LineageLost,
    load_checkpoint,
    read_checkpoint,
    register_pretrained,
    save_checkpoint,
)
from optuna_fms import dashboard
from optuna_fms.finish import finish_best
from optuna_fms.graphs.describe import describe_architecture
from optuna_fms.lineage import CheckpointRecord, Lineage, RecoverySettings, best_lineage, lineages
from optuna_fms.pruner import FMSPruner
from optuna_fms.retention import RetentionCallback, RetentionReport, collect_garbage
from optuna_fms.rng import TrialRNG
from optuna_fms.sampler import FMSSampler
from optuna_fms.transfer import PriorError, pretrain_surrogate

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "dashboard",
    "LineageLost",
    "CheckpointRecord",
    "FMSPruner",
    "FMSSampler",
    "Lineage",
    "PriorError",
    "pretrain_surrogate",
    "RecoverySettings",
    "RetentionCallback",
    "RetentionReport",
    "TrialRNG",
    "best_lineage",
    "collect_garbage",
    "finish_best",
    "lineages",
    "load_checkpoint",
    "read_checkpoint",
    "register_pretrained",
    "describe_architecture",
    "save_checkpoint",
    "StorageUnavailable",
]
