"""Decisions a person can read: reasons, forecasts, failures, log lines, notes, and the finished best run."""

from __future__ import annotations

import logging
import math
import sys

import optuna
import pytest

import optuna_fms
from optuna_fms import lineage as lin_mod
from optuna_fms.explain import LOGGER_NAME, readable

from tasks import finetune_objective

MAX_STEPS = 4


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def _run(n_trials: int, *, finish: bool = False, **sampler_kwargs) -> tuple[optuna.Study, list[tuple[int, str]]]:
    logger = logging.getLogger(LOGGER_NAME)
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        study = optuna.create_study(
            direction="maximize",
            sampler=optuna_fms.FMSSampler(seed=0, n_startup_trials=3, pool_size=32, **sampler_kwargs),
            pruner=optuna_fms.FMSPruner(max_steps=MAX_STEPS),
        )
        objective = finetune_objective(MAX_STEPS)
        study.optimize(objective, n_trials=n_trials)
        if finish:
            optuna_fms.finish_best(study, objective)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return study, handler.lines


@pytest.fixture(scope="module")
def finished() -> tuple[optuna.Study, list[tuple[int, str]]]:
    return _run(8, finish=True)


def _notes(study: optuna.Study) -> dict[int, str]:
    from optuna_dashboard._note import get_note_from_system_attrs

    attrs = study._storage.get_study_system_attrs(study._study_id)
    return {t.number: get_note_from_system_attrs(attrs, t._trial_id)["body"] for t in study.trials}


def test_numbers_read_as_a_person_writes_them() -> None:
    assert readable(8.947e-180) == "≈0"
    assert readable(0.0) == "≈0"
    assert readable(0.0002) == "0.0002"
    assert readable(0.0031234) == "0.003123"
    assert readable(0.91234567) == "0.9123"
    assert readable(-1234567.0) == "-1,234,567"
    assert readable(float("nan")) == "nan"


def test_a_thawed_then_frozen_segment_keeps_both_reasons_and_forecasts(finished) -> None:
    study, _ = finished
    both = [t for t in study.trials if t.user_attrs.get("fms:thaw_reason") and t.user_attrs.get("fms:freeze_reason")]
    assert both, "the study thawed and froze again no segment"
    t = both[0]
    lineage, parent = t.user_attrs["fms:lineage"], t.user_attrs["fms:parent"]
    assert t.user_attrs["fms:thaw_reason"].startswith(f"thawed lineage {lineage} at step {t.user_attrs['fms:start_step']}: expected gain ")
    assert t.user_attrs["fms:freeze_reason"].startswith(f"frozen at step {t.last_step}: expected gain ")
    assert " vs " in t.user_attrs["fms:freeze_reason"]
    assert study.trials[parent].user_attrs["fms:lineage"] == lineage
    # NOTE: the newest reason stays in fms:decision for readers of older studies
    assert t.user_attrs["fms:decision"] == t.user_attrs["fms:freeze_reason"]
    for key in ("fms:start_predicted", "fms:freeze_predicted"):
        p = t.user_attrs[key]
        assert p["final_step"] == MAX_STEPS - 1 and p["next_step"] <= p["final_step"]
        assert 0.0 <= p["next_mean"] <= 1.5 and p["next_std"] > 0 and p["final_std"] > 0  # accuracies
        assert p["expected_gain"] >= 0 and p["alternative_gain"] is not None and p["alternative"]
    # the freeze happened because the alternative's gain was larger (FMSPruner's margin 0.2)
    frozen = t.user_attrs["fms:freeze_predicted"]
    assert frozen["alternative_gain"] > frozen["expected_gain"]


def test_sentences_carry_no_raw_floats(finished) -> None:
    study, _ = finished
    sentences = [t.user_attrs[k] for t in study.trials for k in ("fms:thaw_reason", "fms:new_reason", "fms:freeze_reason")
                 if k in t.user_attrs]
    assert len(sentences) >= len(study.trials)
    assert not [s for s in sentences if "e-" in s or "e+" in s]


def test_freezes_thaws_and_progress_are_logged(finished) -> None:
    study, lines = finished
    infos = [m for level, m in lines if level == logging.INFO]
    frozen = [t for t in study.trials if "fms:freeze_reason" in t.user_attrs]
    for t in frozen:
        assert f"Trial {t.number} of lineage {t.user_attrs['fms:lineage']} {t.user_attrs['fms:freeze_reason']}." in infos
    for t in study.trials:
        if "fms:thaw_reason" in t.user_attrs:
            assert f"Trial {t.number} {t.user_attrs['fms:thaw_reason']}." in infos
    progress = [m for m in infos if m.startswith("FMS: ")]
    assert len(progress) == len(study.trials)  # one line after each trial
    assert progress[-1].startswith(f"FMS: {len(study.trials)} trials, "
                                   f"{sum(len(t.intermediate_values) for t in study.trials)} steps; best ")
    assert "1 finished" in progress[-1]


def test_progress_line_can_be_turned_off() -> None:
    _, lines = _run(2, progress=False, dashboard=False)
    assert [m for _, m in lines if m.startswith("Trial 0 of lineage 0 frozen at step 0")]
    assert not [m for _, m in lines if m.startswith("FMS: ")]


def test_finish_best_ends_the_study_with_its_best_lineage_trained_to_the_end(finished) -> None:
    study, _ = finished
    best_trial = study.best_trial
    assert best_trial.state == optuna.trial.TrialState.COMPLETE
    assert best_trial.last_step == MAX_STEPS - 1
    assert best_trial.system_attrs.get(lin_mod.FINISH) is True
    lineage = lin_mod.find_lineage(optuna_fms.lineages(study), best_trial.number)
    assert lineage.state == "finished" and lineage.tail.number == best_trial.number
    assert sorted(lineage.curve) == list(range(MAX_STEPS))
    # before finishing, it was the best lineage by its best value among the ones that could go on
    pre_best = max(v for t in lineage.trials[:-1] for v in t.intermediate_values.values())
    frozen = [lin for lin in optuna_fms.lineages(study) if lin.state == "frozen"]
    assert frozen and all(lin.best(study.direction)[1] <= pre_best for lin in frozen)
    # a second call trains nothing more
    n = len(study.trials)
    assert optuna_fms.finish_best(study, finetune_objective(MAX_STEPS)).number == best_trial.number
    assert len(study.trials) == n


def test_finish_best_compares_full_runs_by_how_they_ended_as_study_best_trial_does() -> None:
    """Two full runs: A peaked higher (0.99) but ended lower (0.90) than B (0.95). The study's best
    trial is B, and finish_best returns B and trains nothing (before, it picked A by its peak and
    returned a trial that was not study.best_trial: tutorial 1 failed that way on 150 trials)."""
    study = optuna.create_study(direction="maximize", sampler=optuna_fms.FMSSampler(seed=0, weights=None,
                                dashboard=False, progress=False), pruner=optuna_fms.FMSPruner(max_steps=3))
    for curve in ([0.5, 0.99, 0.90], [0.6, 0.8, 0.95]):
        trial = study.ask()
        for step, value in enumerate(curve):
            trial.report(value, step)
        study.tell(trial, curve[-1])

    def objective(trial: optuna.Trial) -> float:
        raise AssertionError("nothing should be trained")

    assert study.best_trial.number == 1
    assert optuna_fms.finish_best(study, objective).number == 1
    assert len(study.trials) == 2


def test_each_trial_gets_a_note_with_its_reasons_parent_and_child_by_default(finished) -> None:
    study, _ = finished
    notes = _notes(study)
    assert set(notes) == {t.number for t in study.trials}
    for t in study.trials:
        parent = t.user_attrs.get("fms:parent")
        children = [c.number for c in study.trials if c.user_attrs.get("fms:parent") == t.number]
        assert (f"parent trial {parent if parent is not None else '-'}, "
                f"child trial {children[0] if children else '-'}.") in notes[t.number], t.number
        if "fms:freeze_reason" in t.user_attrs:
            assert t.user_attrs["fms:freeze_reason"] in notes[t.number]
    assert "finish_best" in notes[study.best_trial.number]
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert any(optuna_fms.dashboard.FIGURE_ID in k for k in attrs)  # the figure, refreshed when the run finished


def test_the_dashboard_can_be_turned_off() -> None:
    study, _ = _run(2, dashboard=False, progress=False)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert not [k for k in attrs if "dashboard" in k]


def test_without_optuna_dashboard_it_says_so_once_and_goes_on(monkeypatch, caplog, isolated_warnings) -> None:
    from optuna_fms import reporting

    monkeypatch.setattr(reporting, "_available", None)
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # NOTE: import raises ImportError
    with caplog.at_level("WARNING", logger="optuna_fms"):
        study, _ = _run(2, progress=False)
    said = [r.getMessage() for r in caplog.records if "optuna-dashboard or plotly is not installed" in r.getMessage()]
    assert len(said) == 1 and "dashboard=False" in said[0]
    assert len(study.trials) == 2 and all(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)


def test_explanations_change_no_decision(finished) -> None:
    """The forecast, the notes and the progress line are read-only: the same seeded study with
    all of them off takes the very same decisions."""
    explained, _ = finished
    sampler = optuna_fms.FMSSampler(seed=0, n_startup_trials=3, pool_size=32, dashboard=False, progress=False)
    sampler.policy.settings.explain = False
    silent = optuna.create_study(direction="maximize", sampler=sampler, pruner=optuna_fms.FMSPruner(max_steps=MAX_STEPS))
    silent.optimize(finetune_objective(MAX_STEPS), n_trials=8)
    assert not any("fms:freeze_predicted" in t.user_attrs for t in silent.trials)

    def trace(study: optuna.Study) -> list:
        return [(t.state, t.params, t.intermediate_values, t.user_attrs.get("fms:parent")) for t in study.trials]

    assert trace(explained)[:8] == trace(silent)  # NOTE: trial 8 is finish_best's
    assert any(t.user_attrs.get("fms:parent") is not None for t in silent.trials)  # the trace includes a thaw


def test_a_nan_report_is_the_failure_reason_of_its_trial() -> None:
    study = optuna.create_study(sampler=optuna_fms.FMSSampler(seed=0, dashboard=False), pruner=optuna_fms.FMSPruner())
    trial = study.ask()
    trial.report(math.inf, 0)
    assert trial.should_prune()
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.user_attrs["fms:failure"] == "step 0 reported inf"


def test_a_minimized_metric_reads_in_its_own_units() -> None:
    from optuna_fms.engine.policy import Decision, Forecast
    from optuna_fms.explain import forecast_attr, freeze_sentence, thaw_sentence

    # the engine maximizes: a loss of 0.25 is -0.25 there
    f = Forecast(next_step=5, next_mean=-0.25, next_std=0.01, final_step=11, final_mean=-0.2, final_std=0.03,
                 gain=2e-4, alternative_gain=3.1e-3, alternative_key=17, per_step=True)
    attr = forecast_attr(f, -1.0)
    assert (attr["next_mean"], attr["final_mean"], attr["alternative"]) == (0.25, 0.2, "lineage 17")
    said = freeze_sentence(4, Decision("freeze", 3, forecast=f), -1.0)
    assert said == ("frozen at step 4: expected gain per step 0.0002 here vs 0.0031 for lineage 17; "
                    "forecast 0.25 ± 0.01 at step 5, 0.2 ± 0.03 at step 11")
    new = Forecast(5, -0.3, 0.02, 5, -0.3, 0.02, gain=8.9e-180, alternative_gain=0.0012, alternative_new=True)
    assert thaw_sentence(17, 5, Decision("thaw", 17, forecast=new), -1.0) == (
        "thawed lineage 17 at step 5: expected gain ≈0 vs 0.0012 for the best new configuration; "
        "forecast 0.3 ± 0.02 at step 5")
