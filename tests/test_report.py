"""The benchmark report's reading of issue 4's bar (bench/report.py)."""

import json
from pathlib import Path

from bench.report import against_baselines


def _method(curve: list[float]) -> dict:
    n = len(curve)
    at = {"10%": 0, "25%": n // 4 - 1, "50%": n // 2 - 1, "100%": n - 1}
    return {"curve": {"mean": curve}, "final_regret": {"mean": curve[-1]},
            "regret_at": {f: {"mean": curve[i]} for f, i in at.items()}}


def test_the_bar_compares_each_graph_metanetwork_method_with_every_other_method() -> None:
    summary = {"methods": {
        "fms-gmn-next": _method([0.9, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01]),
        "dyhpo": _method([0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.03]),
        "synetune-dyhpo": _method([0.95, 0.7, 0.2, 0.15, 0.12, 0.1, 0.04, 0.02]),
    }}
    bar = against_baselines(summary)
    assert bar["baselines"] == ["dyhpo", "synetune-dyhpo"]
    assert bar["best_final_baseline"] == "synetune-dyhpo" and bar["best_final"] == 0.02
    gmn = bar["methods"]["fms-gmn-next"]
    # 10 %: 0.9 is not below dyhpo's 0.8; 25 %: 0.5 < 0.6, 0.7; 50 %: 0.2 > 0.15; 100 %: 0.01 < 0.03, 0.02
    assert gmn["lowest_at"] == ["25%", "100%"]
    assert gmn["epochs_to_best_final"] == 7  # 0.02 is first reached at the 7th epoch
    assert set(bar["methods"]) == {"fms-gmn-next"}


def test_a_method_that_never_reaches_the_best_final_regret_says_so() -> None:
    summary = {"methods": {"fms-gmn-next": _method([0.5, 0.4, 0.3, 0.2]), "tpe": _method([0.5, 0.3, 0.2, 0.1])}}
    assert against_baselines(summary)["methods"]["fms-gmn-next"] == {"lowest_at": [], "epochs_to_best_final": None}
    assert against_baselines({"methods": {"fms-gmn-next": _method([0.5, 0.4])}}) == {}


def test_paired_differences_are_taken_seed_by_seed_against_the_default() -> None:
    import numpy as np

    from bench.report import paired_differences

    # the arm is better than the default by exactly 0.01 on every shared seed, although both arms'
    # regret varies by 0.1 between seeds: the paired standard error is 0, the unpaired one is not
    default = np.array([[0.5, 0.3], [0.4, 0.2], [0.6, 0.4]])
    arm = np.array([[0.39, 0.19], [0.49, 0.29], [0.9, 0.9]])  # seeds 1, 0, 7
    out = paired_differences({"default": default, "arm": arm},
                             {"default": [0, 1, 2], "arm": [1, 0, 7]}, [1, 1, 2, 2])
    assert out["reference"] == "default" and list(out["methods"]) == ["arm"]
    info = out["methods"]["arm"]
    assert info["seeds"] == [0, 1]  # seed 7 has no partner, seed 2 none either
    assert np.isclose(info["at"]["100%"]["mean"], -0.01) and np.isclose(info["at"]["100%"]["se"], 0.0)
    assert paired_differences({"tpe": default}, {"tpe": [0, 1, 2]}, [1, 1, 2, 2]) == {}


def test_the_peer_table_bolds_each_fraction_lowest_peer_and_names_what_did_not_run() -> None:
    from bench.report import peer_table

    def info(values: list[float]) -> dict:
        return {"seeds": [0, 1], "regret_at": {f: {"mean": v} for f, v in zip(["10%", "25%", "50%", "100%"], values)}}

    # the design hubs' `fms-gmn-next` stands in for `default`; Syne Tune did not run here
    table = peer_table([{"hub": "h", "methods": {"fms-gmn-next": info([0.3, 0.2, 0.1, 0.05]),
                                                 "tpe-sha": info([0.2, 0.25, 0.1, 0.06])}}])
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert rows["default"] == "| h | default | 0.3 | **0.2** | **0.1** | **0.05** | 2 |"
    assert rows["TPE + SHA"] == "| h | TPE + SHA | **0.2** | 0.25 | **0.1** | 0.06 | 2 |"
    assert "not run" in rows["Syne Tune DyHPO"] and rows["random"].endswith("| 0 |")


def test_the_readme_peer_table_is_the_one_the_committed_summaries_generate() -> None:
    from bench.report import RESULTS, peer_table

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    hubs = ["digits", "animal", "arch", "tabular", "tokens"]
    table = peer_table([json.loads((RESULTS / h / "summary.json").read_text()) for h in hubs])
    assert f"--peer-table {' '.join(hubs)}" in readme
    assert table in readme, "regenerate the README's peer table with the command above it"


def test_the_pair_table_pairs_two_named_arms_per_folder_and_adds_stouffers_z(tmp_path: Path) -> None:
    import math

    from bench.report import pair_table

    def write(folder: Path, method: str, seed: int, best_val: list[float]) -> None:
        (folder / "runs").mkdir(parents=True, exist_ok=True)
        rec = {"method": method, "seed": seed, "budget": len(best_val), "hub_fingerprint": "h",
               "oracle": {"val_acc": 1.0}, "trace": {"best_val": best_val}}
        (folder / "runs" / f"{method}-s{seed}.json").write_text(json.dumps(rec))

    folders = [tmp_path / "a", tmp_path / "b"]
    for i, folder in enumerate(folders):
        for seed in range(3):
            base = [0.5 + 0.1 * seed] * 4
            write(folder, "ref", seed, base)
            # folder a: the arm gains 0.01, 0.02, 0.03 over the seeds (mean 0.02, se 0.00577: z -3.46);
            # folder b: the arm is identical (z 0); a third arm in the folder is ignored
            write(folder, "arm", seed, [v + (0.01 * (seed + 1) if i == 0 else 0.0) for v in base])
            write(folder, "other", seed, [0.0] * 4)
    table = pair_table(folders, "arm", "ref")
    rows = table.strip().splitlines()
    assert len(rows) == 2 + 2 + 1 and "other" not in table
    assert "-0.0200 +/- 0.0058 (z -3.5)" in rows[2] and "+0.0000 +/- 0.0000 (z +0.0)" in rows[3]
    assert rows[-1].endswith(" | " + " | ".join([f"{-3.4641 / math.sqrt(2):+.2f}"] * 4) + " |")
