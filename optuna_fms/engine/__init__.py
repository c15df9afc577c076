"""The FMS algorithm on plain tensors: no Optuna, no storage. Observations in, a decision out."""

from optuna_fms.engine.history import Candidate, History, LineageRecord
from optuna_fms.engine.policy import Decision, FreezeThawPolicy, PolicySettings
from optuna_fms.engine.space import Dimension, SearchSpace
from optuna_fms.engine.surrogate import GPSurrogate, FitSettings

__all__ = [
    "Candidate",
    "Decision",
    "GPSurrogate",
    "Dimension",
    "FitSettings",
    "FreezeThawPolicy",
    "History",
    "LineageRecord",
    "PolicySettings",
    "SearchSpace",
]
