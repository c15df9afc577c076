"""Decisions in words: the sentence, the forecast attrs and the log line of each freeze, thaw,
new configuration and failure.

The engine hands over plain numbers (:class:`optuna_fms.engine.policy.Forecast`); this module
turns them into what a person reads in optuna-dashboard and in the log. Each writer has its
own attr (see lineage.py's ``USER_*_REASON``), so a thawed segment that is frozen again keeps
both reasons; ``fms:decision`` stays as the newest sentence, for readers of older studies.
Log lines go to ``optuna.fms``, a child of Optuna's logger: they look like Optuna's and follow
``optuna.logging.set_verbosity``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import optuna
from optuna.study import StudyDirection

from optuna_fms import lineage as lin_mod

if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial

    from optuna_fms.engine.policy import Decision, Forecast

LOGGER_NAME = "optuna.fms"
logger = optuna.logging.get_logger(LOGGER_NAME)


def readable(x: float | None) -> str:
    """A number as a person reads it: 4 significant digits, "≈0" for what is below 1e-4."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    if abs(x) < 1e-4:
        return "≈0"  # NOTE: EI of a hopeless candidate is 1e-180; it means nothing more than zero
    if abs(x) >= 1e5:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def _sign(study: Study) -> float:
    return 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0


def forecast_attr(forecast: Forecast, sign: float) -> dict[str, Any]:
    """The forecast as a JSON object in the study's own units (a minimized metric flipped back)."""
    alternative = (f"lineage {forecast.alternative_key}" if forecast.alternative_key is not None
                   else "a new configuration" if forecast.alternative_new else None)
    return {
        "next_step": forecast.next_step,
        "next_mean": sign * forecast.next_mean,
        "next_std": forecast.next_std,
        "final_step": forecast.final_step,
        "final_mean": sign * forecast.final_mean,
        "final_std": forecast.final_std,
        "expected_gain": forecast.gain,
        "alternative": alternative,
        "alternative_gain": forecast.alternative_gain,
        "gain_per_step": forecast.per_step,
    }


def _gain_words(forecast: Forecast, here: str) -> str:
    unit = "expected gain per step" if forecast.per_step else "expected gain"
    text = f"{unit} {readable(forecast.gain)}{here}"
    if forecast.alternative_gain is not None:
        other = (f"lineage {forecast.alternative_key}" if forecast.alternative_key is not None
                 else "the best new configuration")
        text += f" vs {readable(forecast.alternative_gain)} for {other}"
    return text


def _forecast_words(forecast: Forecast, sign: float) -> str:
    nxt = f"{readable(sign * forecast.next_mean)} ± {readable(forecast.next_std)} at step {forecast.next_step}"
    if forecast.final_step == forecast.next_step:
        return f"forecast {nxt}"
    return (f"forecast {nxt}, {readable(sign * forecast.final_mean)} ± {readable(forecast.final_std)} "
            f"at step {forecast.final_step}")


def freeze_sentence(step: int, decision: Decision, sign: float) -> str:
    """E.g. "frozen at step 4: expected gain 0.0002 here vs 0.0031 for lineage 17; forecast ..."."""
    f = decision.forecast
    if f is None:
        return f"frozen at step {step}: {decision.reason}"
    return f"frozen at step {step}: {_gain_words(f, ' here')}; {_forecast_words(f, sign)}"


def thaw_sentence(lineage_id: int, start_step: int, decision: Decision, sign: float) -> str:
    """E.g. "thawed lineage 17 at step 5: expected gain 0.0031 vs 0.0012 for the best new configuration"."""
    f = decision.forecast
    if f is None:
        return f"thawed lineage {lineage_id} at step {start_step}: {decision.reason}"
    return f"thawed lineage {lineage_id} at step {start_step}: {_gain_words(f, '')}; {_forecast_words(f, sign)}"


def new_sentence(decision: Decision, sign: float) -> str:
    f = decision.forecast
    if f is None:
        return f"new configuration: {decision.reason}"
    words = _gain_words(f, f" at step {f.next_step}")
    if f.alternative_key is not None:
        words += " (the best frozen lineage)"
    return f"new configuration: {words}; {_forecast_words(f, sign)}"


def record_freeze(study: Study, trial: FrozenTrial, decision: Decision) -> str:
    """The pruner froze ``trial`` at its last step: its own attrs, and one log line."""
    step = trial.last_step if trial.last_step is not None else 0
    sentence = freeze_sentence(step, decision, _sign(study))
    write = lin_mod.write_trial_attr
    write(study, trial._trial_id, lin_mod.USER_FREEZE_REASON, sentence, user=True)
    if decision.forecast is not None:
        write(study, trial._trial_id, lin_mod.USER_FREEZE_PREDICTED, forecast_attr(decision.forecast, _sign(study)),
              user=True)
    write(study, trial._trial_id, lin_mod.USER_DECISION, sentence, user=True)
    logger.info(f"Trial {trial.number} of lineage {lin_mod.lineage_label(trial)} {sentence}.")
    return sentence


def record_start(study: Study, trial: FrozenTrial, decision: Decision, sentence: str, *,
                 thawed: int | None, skipped: dict[int, str] | None = None) -> None:
    """The sampler thawed lineage ``thawed`` (None: started a new configuration) with ``trial``.

    ``skipped``: lineages the engine chose first but that could not be thawed, and why.
    """
    if skipped:
        sentence += "; not thawed first: " + "; ".join(f"lineage {k} ({why})" for k, why in skipped.items())
    key = lin_mod.USER_THAW_REASON if thawed is not None else lin_mod.USER_NEW_REASON
    lin_mod.set_user_attr(study, trial, key, sentence)
    lin_mod.set_user_attr(study, trial, lin_mod.USER_DECISION, sentence)
    if decision.forecast is not None:
        lin_mod.set_user_attr(study, trial, lin_mod.USER_START_PREDICTED, forecast_attr(decision.forecast, _sign(study)))
    if decision.acquisition is not None:  # NOTE: numeric, so optuna-dashboard can sort trials by it
        lin_mod.set_user_attr(study, trial, lin_mod.USER_ACQUISITION, float(decision.acquisition))
    if thawed is not None:
        logger.info(f"Trial {trial.number} {sentence}.")
    else:
        logger.debug(f"Trial {trial.number}: {sentence}.")


def record_retry(study: Study, trial: FrozenTrial, sentence: str, *, continues: bool) -> None:
    """A retry of a dead segment: it continues its lineage (``continues``) or starts afresh.

    NOTE: Optuna's retry callbacks copy the dead trial's user attrs; its reasons and forecasts
    described that trial's decision, not this one, so they are replaced or emptied. Only a
    continuing retry is logged here: the sampler warns once about one that starts afresh.
    """
    key, other = ((lin_mod.USER_THAW_REASON, lin_mod.USER_NEW_REASON) if continues
                  else (lin_mod.USER_NEW_REASON, lin_mod.USER_THAW_REASON))
    lin_mod.set_user_attr(study, trial, key, sentence)
    for stale in (other, lin_mod.USER_START_PREDICTED, lin_mod.USER_ACQUISITION, lin_mod.USER_FREEZE_REASON,
                  lin_mod.USER_FREEZE_PREDICTED, lin_mod.USER_FAILURE):
        if stale in trial.user_attrs:
            lin_mod.set_user_attr(study, trial, stale, None)
    if continues:
        logger.info(f"Trial {trial.number} {sentence}.")


def record_failure(study: Study, trial: FrozenTrial | None, reason: str, *, lineage_id: int | None = None,
                   log: bool = True) -> None:
    """A lineage failed: ``fms:failure`` on the running ``trial`` (finished ones are immutable, so
    the study-level failed mark carries it there), and a warning."""
    if trial is not None:
        lin_mod.write_trial_attr(study, trial._trial_id, lin_mod.USER_FAILURE, reason, user=True)
    if log:
        who = f"Trial {trial.number}" if trial is not None else "FMS"
        where = f" lineage {lineage_id}" if lineage_id is not None else ""
        logger.warning(f"{who}:{where} failed: {reason}.")
