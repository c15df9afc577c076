"""optuna-fms as an OptunaHub package: the sampler and pruner of the installed ``optuna_fms``.

NOTE: nothing is copied here; the package is ``pip install optuna-fms`` (see requirements.txt), so
the hub module and the library can never disagree.
"""

from optuna_fms import (
    FMSPruner,
    FMSSampler,
    RecoverySettings,
    RetentionCallback,
    best_lineage,
    finish_best,
    lineages,
    load_checkpoint,
    register_pretrained,
    save_checkpoint,
)

__all__ = [
    "FMSPruner",
    "FMSSampler",
    "RecoverySettings",
    "RetentionCallback",
    "best_lineage",
    "finish_best",
    "lineages",
    "load_checkpoint",
    "register_pretrained",
    "save_checkpoint",
]
