"""Regenerate ``bench/results/<hub>/{summary.json, regret.png, regret-all.png, RESULTS.md}`` from the runs of that hub.

    python -m bench.report digits        # or a results folder: python -m bench.report bench/results/digits

Measures (issue 4): regret = the hub's best validation accuracy minus the best found so far, mean and
standard error over seeds against epochs spent (log-log) and against seconds (the table's epoch times plus
the measured decision time); a rank table at 10, 25, 50 and 100 % of the budget; the incumbent's held-out
test accuracy (recorded, never used for decisions); decision overhead; and, for FMS methods, Kendall tau
between the surrogate's forecast of final values and the true final values (see
:func:`bench.runner.surrogate_tau`).
"""

from __future__ import annotations

from collections import defaultdict
import json
import math
from pathlib import Path
import sys
import warnings
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (0.10, 0.25, 0.50, 1.00)
PRODUCT = "fms-gmn-next"  # optuna-fms's defaults: drawn bold and black
GMN = "fms-gmn"  # methods named so read the weights through the graph metanetwork; the rest are baselines
# NOTE: the main plot (regret.png) draws the methods issue 4 names, so its lines stay readable;
# regret-all.png draws every method that ran, opt-in variants included.
MAIN = ("random", "tpe", "tpe-hyperband", "tpe-sha", "gp-median", "dyhpo", "fms-flat-next", PRODUCT,
        "fms-gmn-nolc", "synetune-dyhpo")


def _note(method: str, rec: dict[str, Any]) -> str:
    """The method's description as bench/methods.py (or bench/synetune.py) has it now (the run's copy if
    it is gone)."""
    from bench import methods as methods_mod
    from bench.synetune import METHODS as SYNETUNE

    known = methods_mod.METHODS.get(method)
    outside = dict(SYNETUNE.values())
    return known.note if known is not None else outside.get(method, rec.get("method_note", ""))


def load_runs(out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted((out_dir / "runs").glob("*.json")):
        rec = json.loads(path.read_text())
        runs[rec["method"]].append(rec)
    for recs in runs.values():
        recs.sort(key=lambda r: r["seed"])
    prints = {r.get("hub_fingerprint") for recs in runs.values() for r in recs}
    if len(prints) > 1:  # NOTE: runs on different builds of a hub are not comparable
        raise ValueError(f"{out_dir / 'runs'} mixes runs of hub builds {sorted(map(str, prints))}; "
                         "rerun the stale ones (python -m bench.compare --force) or remove them")
    return dict(runs)


def _best_val_matrix(recs: list[dict[str, Any]], budget: int) -> np.ndarray:
    """[seeds, budget] best validation accuracy after each epoch (a run that ended early keeps its last)."""
    out = np.full((len(recs), budget), np.nan)
    for i, r in enumerate(recs):
        bv = np.asarray(r["trace"]["best_val"], dtype=float)[:budget]
        out[i, : len(bv)] = bv
        if len(bv) and len(bv) < budget:
            out[i, len(bv):] = bv[-1]
    return out


def _mean_se(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    n = np.sum(np.isfinite(x), axis=axis)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns and single seeds
        mean = np.nanmean(x, axis=axis)
        sd = np.nanstd(x, axis=axis, ddof=1) if x.shape[axis] > 1 else np.zeros_like(mean)
    return mean, np.where(n > 1, sd / np.sqrt(np.maximum(n, 1)), np.nan)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1 = lowest value), ties shared."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_v = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def checkpoint_epochs(budget: int) -> list[int]:
    """The epochs at which regret is read: each of FRACTIONS of ``budget``, at least the first."""
    return [max(1, math.ceil(f * budget)) for f in FRACTIONS]


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    any_rec = next(r for recs in runs.values() for r in recs)
    budget = max(r["budget"] for recs in runs.values() for r in recs)
    oracle = any_rec["oracle"]
    checkpoints = checkpoint_epochs(budget)
    common = sorted(set.intersection(*(set(r["seed"] for r in recs) for recs in runs.values())))
    methods = list(runs)
    regret = {m: oracle["val_acc"] - _best_val_matrix(runs[m], budget) for m in methods}
    # ranks per common seed at each checkpoint
    rank_sum = {m: np.zeros(len(checkpoints)) for m in methods}
    for seed in common:
        for k, e in enumerate(checkpoints):
            vals = np.array([regret[m][[r["seed"] for r in runs[m]].index(seed), e - 1] for m in methods])
            for m, rk in zip(methods, _ranks(vals)):
                rank_sum[m][k] += rk
    out: dict[str, Any] = {
        "hub": any_rec["hub"], "hub_fingerprint": any_rec.get("hub_fingerprint"), "budget": budget,
        "n_epochs": any_rec["n_epochs"], "oracle": oracle, "fractions": list(FRACTIONS),
        "checkpoint_epochs": checkpoints, "seeds_ranked": common, "methods": {},
    }
    by_seed = {m: {r["seed"]: (r["trace"]["config"], r["trace"]["step"]) for r in runs[m]} for m in methods}
    # NOTE: the surrogate's floating point differs between CPUs, and a near-tie decided otherwise
    # changes the rest of a study; the record says where each run came from.
    cpus: dict[str, int] = defaultdict(int)
    for recs in runs.values():
        for r in recs:
            cpus[r.get("machine", {}).get("cpu", "unrecorded")] += 1
    out["cpus"] = dict(sorted(cpus.items()))
    out["identical"] = [[a, b] for i, a in enumerate(methods) for b in methods[i + 1:]
                        if common and all(by_seed[a][s] == by_seed[b][s] for s in common)]
    for m in methods:
        recs = runs[m]
        mean, se = _mean_se(regret[m])
        inc_test = np.array([r["final"]["inc_test"] if r["final"]["inc_test"] is not None else np.nan for r in recs])
        t_mean, t_se = _mean_se(inc_test)
        sampler_p50 = [r["overhead"]["sampler_p50_s"] for r in recs if r["overhead"]["sampler_p50_s"] is not None]
        pruner_p50 = [r["overhead"]["pruner_p50_s"] for r in recs if r["overhead"]["pruner_p50_s"] is not None]
        decision = [r["overhead"]["sampler_total_s"] + r["overhead"]["pruner_total_s"] for r in recs]
        taus = [r["tau"] for r in recs if r.get("tau") and "error" not in r["tau"]]

        def tau_mean(key: str) -> float | None:
            v = [t[key] for t in taus if t.get(key) is not None]
            return round(float(np.mean(v)), 4) if v else None

        out["methods"][m] = {
            "note": _note(m, recs[0]),
            "seeds": [r["seed"] for r in recs],
            "regret_at": {f"{int(f * 100)}%": {"epoch": e, "mean": float(mean[e - 1]), "se": _f(se[e - 1])}
                          for f, e in zip(FRACTIONS, checkpoints)},
            "mean_rank_at": ({f"{int(f * 100)}%": round(float(rank_sum[m][k] / len(common)), 3)
                              for k, f in enumerate(FRACTIONS)} if common else None),
            "final_regret": {"mean": float(mean[-1]), "se": _f(se[-1]),
                             "per_seed": [float(x) for x in regret[m][:, -1]]},
            "inc_test_acc": {"mean": _f(t_mean), "se": _f(t_se), "per_seed": [_f(x) for x in inc_test]},
            "trials": float(np.mean([r["final"]["n_trials"] for r in recs])),
            "thaws": float(np.mean([r["final"]["n_thaws"] for r in recs])),
            "lineages": float(np.mean([r["final"]["n_lineages"] for r in recs])),
            "full_runs": float(np.mean([r["final"]["n_full_runs"] for r in recs])),
            "overhead": {
                "sampler_p50_s": _f(np.median(sampler_p50)) if sampler_p50 else None,
                "pruner_p50_s": _f(np.median(pruner_p50)) if pruner_p50 else None,
                "decision_total_s": _f(np.mean(decision)),
                "decision_per_epoch_s": _f(np.mean(decision) / budget),
                "train_s": _f(np.mean([r["final"]["train_s"] for r in recs])),
                "wall_s": _f(np.mean([r["wall_s"] for r in recs])),
            },
            "tau": ({k: tau_mean(k) for k in ("partial", "partial_last_value", "partial_early",
                                              "partial_early_last_value", "unseen")}
                    | {"n_partial": tau_mean("n_partial"), "n_unseen": tau_mean("n_unseen"), "runs": len(taus)})
            if taus else None,
            "curve": {"mean": [round(float(x), 5) for x in mean], "se": [_f(x, 5) for x in se]},
        }
    out["bar"] = against_baselines(out)
    out["paired"] = paired_differences(regret, {m: [r["seed"] for r in runs[m]] for m in methods}, checkpoints)
    return out


PAIRED_REFERENCES = ("default", "dyhpo")  # the first one present is what every other arm is paired with


def paired_differences(regret: dict[str, np.ndarray], seeds: dict[str, list[int]],
                       checkpoints: list[int], reference: str | None = None) -> dict[str, Any]:
    """Each arm minus the reference arm (given, else the first of PAIRED_REFERENCES present), seed
    by seed, at each checkpoint: mean, standard error, n.

    NOTE: the seeds of two arms share their start-up design and their hub, so the paired difference
    has a much smaller standard error than the two means' (the protocol of bench/README.md).
    """
    ref = reference if reference is not None else next((m for m in PAIRED_REFERENCES if m in regret), None)
    if ref is None:
        return {}
    out: dict[str, Any] = {"reference": ref, "methods": {}}
    for m in regret:
        common = sorted(set(seeds[m]) & set(seeds[ref]))
        if m == ref or len(common) < 2:
            continue
        a = regret[m][[seeds[m].index(s) for s in common]]
        b = regret[ref][[seeds[ref].index(s) for s in common]]
        at = {}
        for f, e in zip(FRACTIONS, checkpoints):
            d = a[:, e - 1] - b[:, e - 1]
            se = float(np.std(d, ddof=1) / np.sqrt(len(d)))
            at[f"{int(f * 100)}%"] = {"mean": float(np.mean(d)), "se": se,
                                      "z": float(np.mean(d) / se) if se > 0 else None}
        out["methods"][m] = {"seeds": common, "at": at}
    return out


def against_baselines(summary: dict[str, Any]) -> dict[str, Any]:
    """Issue 4's bar for each graph-metanetwork method: at which fractions of the budget its mean regret
    is below every baseline's, and after how many epochs its mean regret first reaches the best
    baseline's final mean regret (the bar asks for a third of the budget)."""
    ms = summary["methods"]
    baselines = [m for m in ms if not m.startswith(GMN)]
    if not baselines:
        return {}
    best_final = min(baselines, key=lambda m: ms[m]["final_regret"]["mean"])
    target = ms[best_final]["final_regret"]["mean"]
    out: dict[str, Any] = {"baselines": baselines, "best_final_baseline": best_final, "best_final": target,
                           "methods": {}}
    for m in ms:
        if not m.startswith(GMN):
            continue
        lowest = [f for f, v in ms[m]["regret_at"].items()
                  if all(v["mean"] < ms[b]["regret_at"][f]["mean"] for b in baselines)]
        reached = next((e for e, r in enumerate(ms[m]["curve"]["mean"], 1) if r <= target + 1e-12), None)
        out["methods"][m] = {"lowest_at": lowest, "epochs_to_best_final": reached}
    return out


def _f(x: Any, nd: int = 6) -> float | None:
    return round(float(x), nd) if x is not None and np.isfinite(x) else None


def plot(runs: dict[str, list[dict[str, Any]]], summary: dict[str, Any], path: Path,
         methods: tuple[str, ...] | None = None) -> list[str]:
    """Regret against epochs and against seconds, for ``methods`` (default: all that ran); returns
    the methods drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget, oracle = summary["budget"], summary["oracle"]["val_acc"]
    # NOTE: log scale cannot show 0; a regret of exactly 0 is drawn at the floor (stated on the axis).
    floor = 1e-3
    shown = [m for m in summary["methods"] if methods is None or m in methods]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6) if len(shown) <= 12 else (13, 6.2))
    epochs = np.arange(1, budget + 1)
    styles = ("-", "--", "-.", ":")  # so that coinciding curves stay visible
    # NOTE: tab10's colours are the most distinct; tab20 (pairs of light and dark) for more methods.
    colors = plt.get_cmap("tab10" if len(shown) <= 10 else "tab20").colors
    for k, m in enumerate(shown):
        info = summary["methods"][m]
        ls = "-" if m == PRODUCT else styles[k % len(styles)]
        width = 2.4 if m == PRODUCT else 1.3
        mean = np.maximum(np.array(info["curve"]["mean"]), floor)
        se = np.array([np.nan if s is None else s for s in info["curve"]["se"]])
        line, = ax1.plot(epochs, mean, label=f"{m} (n={len(info['seeds'])})", drawstyle="steps-post", ls=ls,
                         color="black" if m == PRODUCT else colors[k % len(colors)], lw=width)
        lo, hi = np.maximum(mean - np.nan_to_num(se), floor), mean + np.nan_to_num(se)
        ax1.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.18, step="post")
        # seconds: each seed's regret after each epoch at (table training seconds + measured decision seconds)
        recs = runs[m]
        secs = [np.array(r["trace"]["train_s"]) + np.array(r["trace"]["decision_s"]) for r in recs]
        t_max = max(s[-1] for s in secs)
        grid = np.geomspace(max(min(s[0] for s in secs), 1e-3), t_max, 200)
        vals = np.full((len(recs), len(grid)), np.nan)
        for i, (r, s) in enumerate(zip(recs, secs)):
            rg = oracle - np.array(r["trace"]["best_val"])
            idx = np.searchsorted(s, grid, side="right") - 1
            ok = idx >= 0
            vals[i, ok] = rg[idx[ok]]
            vals[i, grid > s[-1]] = rg[-1]
        with np.errstate(all="ignore"):
            mean_t, se_t = _mean_se(vals)
        mean_t = np.maximum(mean_t, floor)
        ax2.plot(grid, mean_t, color=line.get_color(), label=m, ls=ls, lw=width)
        ax2.fill_between(grid, np.maximum(mean_t - np.nan_to_num(se_t), floor), mean_t + np.nan_to_num(se_t),
                         color=line.get_color(), alpha=0.18)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylabel(f"regret (best val acc {oracle:.4f} - best found; 0 drawn at {floor:g})")
    ax1.set_xlabel("epochs spent")
    ax2.set_xlabel("seconds: table epoch times + measured sampler/pruner time")
    ax1.set_title(f"{summary['hub']}: regret vs epochs (mean +/- s.e.)")
    ax2.set_title("regret vs seconds (decision overhead included)")
    if len(shown) > 12:  # NOTE: the legend goes below the axes, where it hides no curve
        fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
        fig.subplots_adjust(bottom=0.3)
    else:
        if shown:  # (none of these methods ran: empty axes, no legend)
            ax1.legend(fontsize=8)
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return shown


def markdown(summary: dict[str, Any]) -> str:
    ms = summary["methods"]
    fr = [f"{int(f * 100)}%" for f in summary["fractions"]]
    o = summary["oracle"]
    lines = [
        f"# {summary['hub']}: HPO methods replayed on the hub",
        "",
        "Generated by `python -m bench.report " + summary["hub"] + "` from `runs/*.json` "
        "(`python -m bench.compare` writes them). Do not edit by hand.",
        "",
        f"- Hub `{summary['hub']}` (fingerprint `{summary['hub_fingerprint']}`), {summary['n_epochs']} epochs per run;"
        f" budget {summary['budget']} epochs per study; seeds ranked: {summary['seeds_ranked']}.",
        f"- Oracle: best validation accuracy {o['val_acc']:.4f} (config {o['config']}, epoch {o['epoch']};"
        f" its test accuracy {o['test_acc']:.4f}). Regret = oracle - best validation accuracy found so far.",
        "- Mean +/- standard error over seeds. Ranks: per seed, 1 = lowest regret (ties share), then averaged.",
        "- Runs per CPU (the surrogate's floating point, and so a study's near-tie decisions, can differ"
        " between CPUs): " + ", ".join(f"{cpu} {n}" for cpu, n in summary.get("cpus", {}).items()) + ".",
    ]
    for a, b in summary.get("identical", []):
        lines.append(f"- `{a}` and `{b}` charged exactly the same (configuration, epoch) sequence on every seed"
                     " (e.g. TPE's first 10 trials are random draws with the same seed), so their curves coincide.")
    lines += [
        "",
        "## Regret at fractions of the budget",
        "",
        "| method | " + " | ".join(f"regret @{f} (ep {e})" for f, e in zip(fr, summary["checkpoint_epochs"]))
        + " | " + " | ".join(f"rank @{f}" for f in fr) + " |",
        "|---|" + "---:|" * (2 * len(fr)),
    ]
    for m, info in ms.items():
        reg = " | ".join(f"{v['mean']:.4f} +/- {v['se']:.4f}" if v["se"] is not None else f"{v['mean']:.4f}"
                         for v in info["regret_at"].values())
        rk = " | ".join(f"{v:.2f}" for v in info["mean_rank_at"].values()) if info["mean_rank_at"] else ""
        lines.append(f"| {m} | {reg} | {rk} |")
    paired = summary.get("paired") or {}
    if paired.get("methods"):
        lines += [
            "",
            f"## Paired against `{paired['reference']}`",
            "",
            f"Arm minus `{paired['reference']}`, seed by seed (negative: lower regret), mean +/- standard error"
            " of the paired difference; seeds both arms ran.",
            "",
            "| method | seeds | " + " | ".join(fr) + " |",
            "|---|---:|" + "---:|" * len(fr),
        ]
        for m, info in paired["methods"].items():
            lines.append(f"| {m} | {len(info['seeds'])} | " + " | ".join(
                f"{v['mean']:+.4f} +/- {v['se']:.4f}" for v in info["at"].values()) + " |")
    lines += [
        "",
        "## Incumbent test accuracy, search behaviour and decision overhead",
        "",
        "Test accuracy of the configuration and epoch with the best validation accuracy at the end (never used"
        " for decisions). Overhead: median time of one sampler decision per trial (all sampler calls of a trial)"
        " and of one pruner call, and total decision seconds per study, measured in the run's process"
        " (one torch thread, on a shared 2-core machine: read them as upper bounds).",
        "",
        "| method | test acc | trials | lineages | thaws | full runs | sampler p50 s | pruner p50 s |"
        " decision s / study | decision s / epoch | table train s / study | wall s / study |",
        "|---|" + "---:|" * 11,
    ]
    for m, info in ms.items():
        t, ov = info["inc_test_acc"], info["overhead"]
        test = f"{t['mean']:.4f} +/- {t['se']:.4f}" if t["se"] is not None else f"{t['mean']:.4f}"
        lines.append(
            f"| {m} | {test} | {info['trials']:.1f} | {info['lineages']:.1f} | {info['thaws']:.1f} |"
            f" {info['full_runs']:.1f} | {_s(ov['sampler_p50_s'])} | {_s(ov['pruner_p50_s'])} |"
            f" {_s(ov['decision_total_s'], 1)} | {_s(ov['decision_per_epoch_s'], 4)} | {_s(ov['train_s'], 1)} |"
            f" {_s(ov['wall_s'], 1)} |")
    taus = {m: info["tau"] for m, info in ms.items() if info["tau"]}
    if taus:
        lines += [
            "",
            "## How well the FMS surrogate ranks final values (Kendall tau-b)",
            "",
            "At the end of each FMS run the surrogate forecasts the final-epoch validation accuracy; tau is"
            " computed on aligned vectors (same configurations) against the hub's true final values."
            " *partial*: lineages not run to the end, forecast from the epochs they ran (their final value was"
            " never observed); *last value*: the naive ranking by the last observed value on the same set;"
            " *early*: lineages with <= 25 % of the epochs; *unseen*: up to 200 grid configurations never"
            " started (configuration and pretrained weights only). Means over runs.",
            "",
            "| method | n partial | partial | last value | early | early, last value | n unseen | unseen |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m, t in taus.items():
            lines.append(f"| {m} | {_s(t['n_partial'], 1)} | {_s(t['partial'], 3)} | {_s(t['partial_last_value'], 3)} |"
                         f" {_s(t['partial_early'], 3)} | {_s(t['partial_early_last_value'], 3)} |"
                         f" {_s(t['n_unseen'], 0)} | {_s(t['unseen'], 3)} |")
    bar = summary.get("bar")
    if bar and bar["methods"]:
        lines += [
            "",
            "## Against the bar",
            "",
            f"Baselines: every method not named `{GMN}*` ({len(bar['baselines'])}). The lowest final regret among"
            f" them: {bar['best_final']:.4f} (`{bar['best_final_baseline']}`); the bar asks that the graph"
            f" metanetwork reach it within a third of the budget ({summary['budget'] // 3} epochs).",
            "",
            "| method | lowest of all baselines at | epochs to the best baseline's final regret |",
            "|---|---|---:|",
        ]
        for m, b in bar["methods"].items():
            lines.append(f"| {m} | {', '.join(b['lowest_at']) or 'none'} |"
                         f" {b['epochs_to_best_final'] if b['epochs_to_best_final'] is not None else 'never'} |")
    lines += ["", "## Methods", ""] + [f"- `{m}`: {info['note']}" for m, info in ms.items()]
    lines += ["", "![regret: the methods issue 4 names](regret.png)", "",
              "![regret: every method that ran](regret-all.png)", ""]
    return "\n".join(lines)


def _s(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def write_report(out_dir: Path | str) -> dict[str, Any]:
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    if not runs:
        raise SystemExit(f"no runs under {out_dir / 'runs'}")
    summary = summarize(runs)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(runs, summary, out_dir / "regret.png", MAIN)
    plot(runs, summary, out_dir / "regret-all.png")
    (out_dir / "RESULTS.md").write_text(markdown(summary))
    return summary


# NOTE: the README's one table (issue 10): every hub x these peers. Before the `default` method existed,
# the design hubs ran the same constructors as `fms-gmn-next` (bench/methods.py), which stands in for it.
PEERS = (("default", ("default", PRODUCT)), ("DyHPO mode", ("dyhpo",)), ("Syne Tune DyHPO", ("synetune-dyhpo",)),
         ("Syne Tune DyHPO, ordinal", ("synetune-dyhpo-ordinal",)), ("TPE + Hyperband", ("tpe-hyperband",)),
         ("TPE + SHA", ("tpe-sha",)), ("random", ("random",)))


def peer_table(summaries: list[dict[str, Any]]) -> str:
    """Markdown: one row per hub and peer, regret at each fraction; bold = lowest of the hub's peers there."""
    fr = [f"{int(f * 100)}%" for f in FRACTIONS]
    lines = ["| hub | method | " + " | ".join(fr) + " | seeds |", "|---|---|" + "---:|" * (len(fr) + 1)]
    for summary in summaries:
        rows = []
        for label, names in PEERS:
            name = next((n for n in names if n in summary["methods"]), None)
            rows.append((label, None if name is None else summary["methods"][name]))
        lowest = {f: min((info["regret_at"][f]["mean"] for _, info in rows if info), default=None) for f in fr}
        for label, info in rows:
            if info is None:
                lines.append(f"| {summary['hub']} | {label} | " + " | ".join("not run" for _ in fr) + " | 0 |")
                continue
            cells = []
            for f in fr:
                v = info["regret_at"][f]["mean"]
                cells.append(f"**{v:.3g}**" if v == lowest[f] else f"{v:.3g}")
            lines.append(f"| {summary['hub']} | {label} | " + " | ".join(cells) + f" | {len(info['seeds'])} |")
    return "\n".join(lines) + "\n"


def pair_table(folders: list[Path], arm: str, reference: str) -> str:
    """Markdown: ``arm`` minus ``reference`` seed by seed in each results folder (mean +/- standard
    error, and z), then the folders together: Stouffer's z, the sum of the per-folder z over the
    square root of their number (the protocol's rule for a new default; bench/README.md)."""
    fr = [f"{int(f * 100)}%" for f in FRACTIONS]
    lines = ["| results | seeds | " + " | ".join(fr) + " |", "|---|---:|" + "---:|" * len(fr)]
    zs: dict[str, list[float]] = {f: [] for f in fr}
    for folder in folders:
        runs = load_runs(folder)
        if arm not in runs or reference not in runs:
            raise ValueError(f"{folder} lacks {arm!r} or {reference!r}: it has {sorted(runs)}")
        pair = {m: runs[m] for m in (arm, reference)}
        budget = max(r["budget"] for recs in pair.values() for r in recs)
        checkpoints = checkpoint_epochs(budget)
        regret = {m: recs[0]["oracle"]["val_acc"] - _best_val_matrix(recs, budget) for m, recs in pair.items()}
        diff = paired_differences(regret, {m: [r["seed"] for r in recs] for m, recs in pair.items()},
                                  checkpoints, reference=reference)["methods"][arm]
        cells = []
        for f in fr:
            d = diff["at"][f]
            z = d["z"] or 0.0  # NOTE: None where the difference has no spread (e.g. both arms identical)
            zs[f].append(z)
            cells.append(f"{d['mean']:+.4f} +/- {d['se']:.4f} (z {z:+.1f})")
        lines.append(f"| {folder} | {len(diff['seeds'])} | " + " | ".join(cells) + " |")
    lines.append("| Stouffer's z | | " + " | ".join(f"{sum(z) / math.sqrt(len(z)):+.2f}" for z in zs.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--pair"]:  # python -m bench.report --pair ARM REFERENCE folder ... -> stdout
        print(pair_table([Path(a) for a in args[3:]], args[1], args[2]), end="")
        return 0
    if args[:1] == ["--peer-table"]:  # python -m bench.report --peer-table digits animal ... -> stdout
        print(peer_table([json.loads((RESULTS / h / "summary.json").read_text()) for h in args[1:]]), end="")
        return 0
    target = Path(args[0]) if args else RESULTS / "digits"
    if not target.is_dir():
        target = RESULTS / str(target)
    write_report(target)
    print(target / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
