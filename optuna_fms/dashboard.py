"""What optuna-dashboard shows of a freeze-thaw study: the lineage figure and one note per trial.

``lineage_figure`` draws every lineage's curve stitched across its segments, with its thaws and
freezes marked and the best lineage highlighted; ``publish`` stores it in the study (the
dashboard's "Plots" tab) together with a note on each finished trial that summarizes its lineage.
``FMSSampler(dashboard=True)`` (the default) does that as the study runs, at a cost bounded by
``max_lineages``.
Needs the optional ``plotly`` and ``optuna-dashboard`` packages (the ``[dashboard]`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
import sys
from typing import TYPE_CHECKING, Any

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from optuna_fms import lineage as lin_mod
from optuna_fms.explain import readable

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from optuna.study import Study

FIGURE_ID = "fms-lineages"  # NOTE: a fixed id, so each refresh overwrites the figure in place


def command(storage: str, artifact_dir: str | Path) -> str:
    """The shell command that opens ``storage`` in optuna-dashboard with its checkpoints.

    NOTE: it names this interpreter's own optuna-dashboard (relative to the working folder when
    inside it), since a fresh shell has no virtual environment on its PATH.
    """
    exe = Path(sys.executable).parent / "optuna-dashboard"
    if not exe.exists():
        name = "optuna-dashboard"
    else:
        try:
            name = str(exe.relative_to(Path.cwd()))
        except ValueError:
            name = str(exe)
    return f"{name} {storage} --artifact-dir {artifact_dir}"


def lineage_figure(
    study: Study, *, max_lineages: int = 40, lineages: Sequence[lin_mod.Lineage] | None = None
) -> go.Figure:
    """Every lineage's stitched curve (the ``max_lineages`` best by their best value), thaws and
    freezes marked, the best lineage drawn thick and coloured. ``lineages``: the study's, if
    already built."""
    import plotly.graph_objects as go

    if lineages is None:
        lineages = lin_mod.lineages(study)
    lineages = [lin for lin in lineages if lin.curve]
    direction = study.direction
    ranked = sorted(lineages, key=lambda lin: _best_value(lin, direction), reverse=True)
    shown = ranked[:max_lineages]
    best = shown[0] if shown else None
    fig = go.Figure()
    thaw_x: list[int] = []
    thaw_y: list[float] = []
    freeze_x: list[int] = []
    freeze_y: list[float] = []
    for lin in reversed(shown):  # NOTE: the best last, so it is drawn on top
        steps = lin.steps
        values = [lin.curve[s] for s in steps]
        is_best = lin is best
        fig.add_trace(go.Scatter(
            x=steps, y=values, mode="lines",
            name=f"lineage {lin.id}" + (" (best)" if is_best else ""),
            line={"width": 4 if is_best else 1, "color": "#d62728" if is_best else "rgba(90,90,90,0.45)"},
            hovertext=f"lineage {lin.id} ({lin.state}): " + _params_text(lin.params),
            showlegend=is_best,
        ))
        for trial in lin.trials:
            seg = sorted(trial.intermediate_values)
            if not seg:
                continue
            if lin_mod.predecessor(trial) is not None and seg[0] in lin.curve:
                thaw_x.append(seg[0])
                thaw_y.append(lin.curve[seg[0]])
            if lin_mod.FROZEN in trial.system_attrs and seg[-1] in lin.curve:
                freeze_x.append(seg[-1])
                freeze_y.append(lin.curve[seg[-1]])
    fig.add_trace(go.Scatter(x=thaw_x, y=thaw_y, mode="markers", name="thawed here",
                             marker={"symbol": "triangle-up", "size": 8, "color": "#2ca02c"}))
    fig.add_trace(go.Scatter(x=freeze_x, y=freeze_y, mode="markers", name="frozen here",
                             marker={"symbol": "line-ew-open", "size": 10, "color": "#1f77b4"}))
    hidden = len(lineages) - len(shown)
    title = f"{len(lineages)} lineages" + (f" ({hidden} weaker ones not drawn)" if hidden else "")
    if best is not None:
        step, value = best.best(direction)
        title += f"; best: lineage {best.id}, {value:.4g} at step {step}"
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="reported value")
    return fig


def lineage_note(lin: lin_mod.Lineage, trial: FrozenTrial, direction: StudyDirection) -> str:
    """Markdown for one trial's note: its lineage's segments, why each started and ended, what
    the surrogate predicted, and the parent and child of this trial."""
    step, value = lin.best(direction)
    numbers = [t.number for t in lin.trials]
    at = numbers.index(trial.number) if trial.number in numbers else None
    parent = lin_mod.predecessor(trial)
    # NOTE: the child link is derived here, not stored: the parent is finished (immutable) when
    # its child starts, so only the child names its parent (fms:parent).
    child = next((t.number for t in lin.trials if lin_mod.predecessor(t) == trial.number), None)
    lines = [
        f"## Lineage {lin.id} ({lin.state})",
        "",
        f"Parameters: {_params_text(lin.params)}",
        "",
        f"Best value {value:.6g} at step {step}; {len(lin.curve)} steps in {len(lin.trials)} "
        f"segment(s), {lin.n_thaws} thaw(s)." if value is not None else "No value reported yet.",
        "",
        f"This trial: segment {at + 1 if at is not None else '?'} of {len(lin.trials)}; "
        f"parent trial {parent if parent is not None else '-'}, child trial {child if child is not None else '-'}.",
        "",
        "| trial | steps | started | ended |",
        "|---:|---|---|---|",
    ]
    for t in lin.trials:
        seg = sorted(t.intermediate_values)
        span = f"{seg[0]}-{seg[-1]}" if seg else "-"
        mark = " (this trial)" if t.number == trial.number else ""
        lines.append(f"| {t.number}{mark} | {span} | {_cell(_started(t))} | {_cell(_ending(t))} |")
    predicted = [(k, trial.user_attrs.get(k)) for k in (lin_mod.USER_START_PREDICTED, lin_mod.USER_FREEZE_PREDICTED)]
    predicted = [(k, p) for k, p in predicted if isinstance(p, dict)]
    if predicted:
        lines += ["", "| forecast of this trial | next step | final step | expected gain | best alternative |",
                  "|---|---|---|---|---|"]
        for key, p in predicted:
            when = "when it started" if key == lin_mod.USER_START_PREDICTED else "when it was frozen"
            lines.append(
                f"| {when} | {_at(p, 'next')} | {_at(p, 'final')} | {readable(p.get('expected_gain'))} | "
                f"{readable(p.get('alternative_gain'))} ({p.get('alternative') or '-'}) |")
    if lin.failure:
        lines += ["", f"Failed: {lin.failure}"]
    return "\n".join(lines)


def publish(
    study: Study,
    *,
    max_lineages: int = 40,
    trials: Sequence[FrozenTrial] | None = None,
    lineages: Sequence[lin_mod.Lineage] | None = None,
    figure: bool = True,
) -> None:
    """Store the lineage figure in the study (unless ``figure=False``), and a note on each of
    ``trials`` (default: none). ``lineages``: the study's, if already built."""
    import optuna_dashboard

    if lineages is None:
        lineages = lin_mod.lineages(study)  # NOTE: built once for the figure and the notes
    if figure:
        optuna_dashboard.save_plotly_graph_object(
            study, lineage_figure(study, max_lineages=max_lineages, lineages=lineages), graph_object_id=FIGURE_ID
        )
    if trials:
        by_trial = {t.number: lin for lin in lineages for t in lin.trials}
        attrs = lin_mod.study_attrs(study)  # NOTE: read once; an unchanged note is not rewritten
        for trial in trials:
            lin = by_trial.get(trial.number)
            if lin is not None:
                _save_trial_note(study, trial, lineage_note(lin, trial, study.direction), attrs)


def _save_trial_note(study: Study, trial: FrozenTrial, body: str, attrs: dict[str, Any] | None = None) -> None:
    # NOTE: optuna_dashboard.save_note takes a live Trial, and building one for a finished trial
    # asks the sampler again; the note lives in study system attrs, written here the way save_note
    # writes them (optuna-dashboard is pinned, so these keys are stable).
    from optuna_dashboard._note import get_note_from_system_attrs, save_note_with_version

    if attrs is None:
        attrs = study._storage.get_study_system_attrs(study._study_id)
    old = get_note_from_system_attrs(attrs, trial._trial_id)
    if old["body"] == body:
        return
    save_note_with_version(study._storage, study._study_id, trial._trial_id, int(old["version"]) + 1, body)


def _best_value(lin: lin_mod.Lineage, direction: StudyDirection) -> float:
    _, value = lin.best(direction)
    if value is None or not math.isfinite(value):
        return -math.inf
    return value if direction == StudyDirection.MAXIMIZE else -value


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def _ending(trial: FrozenTrial) -> str:
    if trial.state == TrialState.COMPLETE:
        return "finished" + (" (finish_best: trained to the last step)" if trial.system_attrs.get(lin_mod.FINISH) else "")
    failure = trial.user_attrs.get(lin_mod.USER_FAILURE) or trial.system_attrs.get(lin_mod.FAILED)
    if failure:
        return f"failed: {failure}"
    if lin_mod.FROZEN in trial.system_attrs:
        return trial.user_attrs.get(lin_mod.USER_FREEZE_REASON) or f"frozen: {trial.system_attrs[lin_mod.FROZEN]}"
    if trial.state == TrialState.FAIL and trial.system_attrs.get("fail_reason"):
        return f"failed: {str(trial.system_attrs['fail_reason']).splitlines()[0]}"
    return trial.state.name.lower()


def _started(trial: FrozenTrial) -> str:
    for key in (lin_mod.USER_THAW_REASON, lin_mod.USER_NEW_REASON):
        if trial.user_attrs.get(key):
            return str(trial.user_attrs[key])
    # NOTE: a study written before the reasons had their own attrs: fms:decision, unless the
    # pruner overwrote it with the freeze
    old = trial.user_attrs.get(lin_mod.USER_DECISION)
    return str(old) if old and lin_mod.FROZEN not in trial.system_attrs else "-"


def _at(p: dict[str, Any], which: str) -> str:
    mean, std, step = p.get(f"{which}_mean"), p.get(f"{which}_std"), p.get(f"{which}_step")
    return f"{readable(mean)} ± {readable(std)} (step {step})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
