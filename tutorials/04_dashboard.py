"""Tutorial 4: read FMS's decisions in optuna-dashboard.

A freeze-thaw study is harder to read than a plain one: one configuration's run (a *lineage*)
is spread over several Optuna trials, most trials end PRUNED although nothing was thrown away,
and the interesting part is *why* a run was frozen or thawed. optuna-fms writes all of it where
optuna-dashboard shows it:

* **The lineage figure** (the study page, under the plots the dashboard draws itself):
  :func:`optuna_fms.dashboard.publish` stores a plotly figure with every lineage's curve stitched
  across its segments, thaws (green triangles) and freezes (blue dashes) marked and the best
  lineage drawn thick and red. ``FMSSampler`` refreshes it while the study runs
  (``dashboard_every=10`` trials, and when a run finishes).
* **A note on every trial** (the trial's "Note" card): the lineage the trial belongs to, its
  segments and how each ended.
* **User attrs** (the trial's "User Attributes" card, also columns of the "Trials (Table)" tab):
  ``fms:lineage`` (the lineage's id: its first trial's number), ``fms:parent`` (the trial whose
  checkpoint a thaw resumes), ``fms:start_step``, ``fms:resume``, ``fms:decision`` (why the
  sampler thawed or started it, or why the pruner froze it) and ``fms:checkpoint_step``.
* **Artifacts**: each trial's checkpoints, named ``lineage-0017-step-0004.safetensors``, and the
  study's registered pretrained weights, named ``pretrained-model=w16-relu-bn.safetensors``.

This script opens a finished study (by default the one tutorial 1 writes), publishes the figure
and the notes once more, prints what the dashboard will show for the best lineage, and prints the
command that opens it. Run it::

    python tutorials/01_finetune_model_hub.py        # the study: tutorials/out/fms.db
    python tutorials/04_dashboard.py                  # read it
    python tutorials/04_dashboard.py --serve          # ... and start the dashboard (Ctrl-C stops it)
    python tutorials/04_dashboard.py --smoke          # a small study of tutorial 1 first (~1 min)

Needs the ``tutorial`` (or ``dashboard``) extra: optuna-dashboard and plotly.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
import sys

import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

import optuna_fms

HERE = Path(__file__).resolve().parent
SMOKE_ARGS = ["--trials", "8", "--epochs", "3"]  # tutorial 1 in well under a minute


def tutorial_01():
    """Tutorial 1 as a module (its file name starts with a digit, so it is loaded by path)."""
    spec = importlib.util.spec_from_file_location("fms_tutorial_01", HERE / "01_finetune_model_hub.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NOTE: dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def describe_trial(trial: optuna.trial.FrozenTrial, store: FileSystemArtifactStore, study: optuna.Study) -> list[str]:
    """What the trial's page shows: state, steps, the fms:* user attrs, the checkpoint artifacts."""
    steps = sorted(trial.intermediate_values)
    span = f"steps {steps[0]}-{steps[-1]}" if steps else "no step"
    lines = [f"  trial {trial.number} ({trial.state.name}, {span})"]
    for key, value in sorted(trial.user_attrs.items()):
        if key.startswith("fms:"):
            lines.append(f"      {key:<20} {value}")
    names = sorted(a.filename for a in get_all_artifact_meta(trial, storage=study._storage))
    if names:
        lines.append(f"      artifacts            {', '.join(names)}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "out",
                        help="tutorial 1's output folder (fms.db and fms-artifacts/)")
    parser.add_argument("--study", default="finetune-model-hub", help="study name in fms.db")
    parser.add_argument("--smoke", action="store_true",
                        help="first run tutorial 1 briefly (" + " ".join(SMOKE_ARGS) + ") into --out")
    parser.add_argument("--serve", action="store_true", help="then start optuna-dashboard here")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)

    t01 = tutorial_01()
    out = args.out.resolve()
    db, artifacts = out / "fms.db", out / "fms-artifacts"
    if args.smoke:
        print(f"Smoke mode: tutorial 1 with {' '.join(SMOKE_ARGS)} into {out}\n", flush=True)
        t01.main([*SMOKE_ARGS, "--out", str(out)])
    if not db.is_file():
        raise SystemExit(f"No study at {db}: run tutorials/01_finetune_model_hub.py first (or pass --smoke).")

    storage = f"sqlite:///{db}"
    study = optuna.load_study(study_name=args.study, storage=storage)
    store = FileSystemArtifactStore(str(artifacts))

    # --- 1. The figure and the notes ---------------------------------------------------------
    # publish() overwrites the figure in place (one figure id) and writes a note on each trial
    # given; tutorial 1 already did this while it ran, so this only makes sure it is current.
    optuna_fms.dashboard.publish(study, trials=study.trials)

    # --- 2. What the dashboard shows for the best lineage -------------------------------------
    lins = optuna_fms.lineages(study)
    best = optuna_fms.best_lineage(study)
    assert best is not None, "the study reported nothing"
    step, value = best.best(study.direction)
    by_state: dict[str, int] = {}
    for lin in lins:
        by_state[lin.state] = by_state.get(lin.state, 0) + 1
    thawed = [lin for lin in lins if lin.n_thaws]

    lines = [
        f"Study '{study.study_name}' (id {study._study_id}): {len(study.trials)} trials, {len(lins)} lineages "
        f"by state {dict(sorted(by_state.items()))}, {sum(lin.n_thaws for lin in lins)} thaws.",
        "",
        f"Best lineage {best.id}: {value:.4f} at step {step}, {len(best.trials)} segment(s). "
        "Its trials, as their pages show them:",
    ]
    for trial in best.trials:
        lines += describe_trial(trial, store, study)
    if thawed and thawed[0] is not best:
        example = max(thawed, key=lambda lin: lin.n_thaws)
        lines += ["", f"A lineage that was thawed ({example.id}, {example.n_thaws} thaw(s)):"]
        for trial in example.trials:
            lines += describe_trial(trial, store, study)
    note_trial = best.trials[-1]
    note = optuna_fms.dashboard.lineage_note(best, note_trial, study.direction)
    lines += ["", f"The note on trial {note_trial.number} (the trial page's Note card):", "",
              *("    " + line for line in note.splitlines())]
    pretrained = sorted(a.filename for a in get_all_artifact_meta(study))
    lines += ["", "Study artifacts (the study page's Artifacts tab: the registered pretrained weights):",
              "  " + (", ".join(pretrained) if pretrained else "none (no register_pretrained call)")]

    # --- 3. Open it ---------------------------------------------------------------------------
    command = optuna_fms.dashboard.command(storage, artifacts)
    url = f"http://{args.host}:{args.port}/dashboard/studies/{study._study_id}"
    lines += [
        "",
        "Open it (the venv's own optuna-dashboard, so it works in a fresh shell):",
        f"  {command}",
        f"then {url}: the lineage figure is on the study page (scroll below the history plot),",
        "the fms:* attrs are columns of 'Trials (Table)' (sort by fms:lineage to group a lineage),",
        "and each trial in 'Trials (List)' shows its note, user attrs and checkpoint artifacts.",
    ]
    print("\n".join(lines), flush=True)

    if args.serve:
        import optuna_dashboard

        print(f"\nServing {url} (Ctrl-C to stop)", flush=True)
        optuna_dashboard.run_server(storage, host=args.host, port=args.port, artifact_store=store)

    return {"study": study, "db": db, "artifacts": artifacts, "command": command, "url": url,
            "best_lineage": best, "pretrained": pretrained}


if __name__ == "__main__":
    main(sys.argv[1:])
