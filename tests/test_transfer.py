"""Transfer across studies: the input layout rule, the prior file, the warm start, the sampler."""

from __future__ import annotations

import json
import math

import numpy as np
import optuna
import pytest
import torch

import optuna_fms
from optuna_fms.engine import GPSurrogate, Dimension, FitSettings, History, LineageRecord, SearchSpace
from optuna_fms.engine.layout import UNKNOWN, InputLayout
from optuna_fms.engine.prior import HEADER_KEY, PretrainSettings, load_prior, pretrain, save_prior

from tasks import digits_task, finetune_objective, make_model

LR = Dimension("lr", "float", 1e-4, 1.0, log=True)
SPACE_A = SearchSpace([LR, Dimension("wd", "float", 0.0, 1.0)])
SPACE_B = SearchSpace([Dimension("lr", "float", 1e-3, 1e-1, log=True), Dimension("mom", "float", 0.0, 1.0)])


def _task(space: SearchSpace, n: int, seed: int, shift: float = 0.0) -> History:
    """Curves that rise to a quality peaked at lr = 10**-(2 + shift); the other parameters are noise."""
    rng = np.random.default_rng(seed)
    records = []
    for i, config in enumerate(space.sample(n, rng)):
        quality = -((math.log10(config["lr"]) + 2 + shift) ** 2)
        steps = list(range(int(rng.integers(1, 9))))
        values = [quality * (1 - math.exp(-(s + 1) / 3)) + 0.01 * rng.normal() for s in steps]
        records.append(LineageRecord(i, config, steps, values))
    return History(space, records, max_steps=8)


def _pretrain_file(tmp_path_factory, kernel: str):
    prior = pretrain([_task(SPACE_A, 40, 0), _task(SPACE_A, 40, 1, shift=0.3)], ["a", "b"], weights=None,
                     settings=PretrainSettings(steps=150), kernel=kernel)
    return save_prior(prior, tmp_path_factory.mktemp("prior") / f"{kernel}.safetensors")


@pytest.fixture(scope="module")
def prior_file(tmp_path_factory):
    """A prior for the default's kernel."""
    return _pretrain_file(tmp_path_factory, "input")


@pytest.fixture(scope="module")
def deep_prior_file(tmp_path_factory):
    return _pretrain_file(tmp_path_factory, "deep")


# --- the rule ----------------------------------------------------------------------------------


def test_union_layout_and_input_map_follow_the_rule() -> None:
    a = SearchSpace([Dimension("lr", "float", 1e-4, 1e-1, log=True), Dimension("bs", "categorical", choices=(16, 64)),
                     Dimension("opt", "categorical", choices=("sgd", "adam"))])
    b = SearchSpace([Dimension("lr", "float", 1e-3, 1.0, log=True), Dimension("bs", "categorical", choices=(64, 128))])
    layout = InputLayout.union([a, b])
    slots = {d.name: d for d in layout.slots}
    assert (slots["lr"].low, slots["lr"].high) == (1e-4, 1.0)  # the widest range
    assert slots["bs"].choices == (16, 64, 128)  # the union of the choices, numbers sorted
    new = SearchSpace([
        Dimension("bs", "categorical", choices=(128, 16)),  # choices among the slot's: read through it
        Dimension("lr", "float", 1e-2, 10.0, log=True),  # range beyond the slot's: columns of its own
        Dimension("wd", "float", 0.0, 0.1),  # a name the prior never saw: columns of its own
    ])
    m = layout.input_map(new)
    assert m.matched == ("bs",) and set(m.extra) == {"lr", "wd"} and set(m.unknown) == {"lr", "opt"}
    assert m.width == layout.width + 2
    configs = [{"bs": 16, "lr": 0.1, "wd": 0.05}, {"bs": 128, "lr": 5.0, "wd": 0.0}]
    x = m.apply(new.encode_many(configs))
    prior_space = SearchSpace(layout.slots)
    for row, config in zip(x, configs):
        # the matched parameter is encoded exactly as the prior encodes that value
        bs_cols = slice(sum(d.width for d in layout.slots[:1]), sum(d.width for d in layout.slots[:2]))
        want = prior_space.encode({"lr": 1e-3, "bs": config["bs"], "opt": "sgd"})[bs_cols]
        assert np.allclose(row[bs_cols], want)
        assert np.all(row[:1] == UNKNOWN)  # lr's slot: this study's lr does not fit it
    assert np.allclose(x[:, layout.width:], new.encode_many(configs)[:, [2, 3]])  # own columns: its own encoding


def test_a_narrower_numeric_range_is_reencoded_on_the_slot_scale() -> None:
    layout = InputLayout([LR])
    narrow = SearchSpace([Dimension("lr", "float", 1e-3, 1e-1, log=True)])
    m = layout.input_map(narrow)
    values = [1e-3, 0.01, 0.05, 0.1]
    mapped = m.apply(narrow.encode_many([{"lr": v} for v in values]))
    assert np.allclose(mapped[:, 0], SearchSpace([LR]).encode_many([{"lr": v} for v in values])[:, 0])
    # another kind of distribution under the same name is not matched
    as_int = SearchSpace([Dimension("lr", "int", 1, 10)])
    assert layout.input_map(as_int).extra == ("lr",)


# --- pretraining and the warm start ------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["input", "deep"])
def test_a_prior_carries_what_its_sources_taught_into_another_space(prior_file, deep_prior_file, kernel) -> None:
    """Pretrained on space A (lr, wd), the surrogate ranks configurations of space B (another lr
    range, a new parameter) from 6 observations better than a surrogate of the same kernel
    fitted on them alone."""
    prior = load_prior(prior_file if kernel == "input" else deep_prior_file)
    assert prior.kernel == kernel
    m = prior.layout.input_map(SPACE_B)
    assert m.matched == ("lr",) and m.unknown == ("wd",) and m.extra == ("mom",)
    target, test = _task(SPACE_B, 6, 5, shift=0.1), _task(SPACE_B, 60, 6, shift=0.1)
    rows, y, keep = target.training_rows()
    test_rows, _, _ = test.training_rows()
    test_y = test.standardize([v for lin in test.lineages for v in lin.values])
    scores = {}
    for name, p in (("none", None), ("prior", prior)):
        s = GPSurrogate(SPACE_B.width, None, settings=FitSettings(full_steps=100), prior=p, kernel=kernel,
                        space=SPACE_B if p is not None else None)
        s.fit(rows, y, keep=keep)
        assert s.kernel == kernel
        mean, _ = s.predict(test_rows)
        scores[name] = float(np.corrcoef(mean, test_y)[0, 1])
    assert scores["prior"] > scores["none"] + 0.1, scores
    assert scores["prior"] > 0.8, scores


def test_the_default_kernels_prior_is_a_frozen_mean_fitted_to_the_study(prior_file) -> None:
    """Input kernel: the prior's mean network is copied and frozen; its offset and scale start at
    the least-squares fit to the new study's values; the new parameter is not read by the mean;
    the slots' lengthscales are the prior's, the new parameter's the fresh default."""
    from optuna_fms.engine import Candidate

    prior = load_prior(prior_file)
    assert prior.tensors["extractor.unknown"].abs().max() > 1e-3  # moved from its zero start
    target = _task(SPACE_B, 6, 5, shift=0.1)
    rows, y, keep = target.training_rows()
    s = GPSurrogate(SPACE_B.width, None, settings=FitSettings(full_steps=0), prior=prior, space=SPACE_B)
    s.fit(rows, y, keep=keep)
    model = s._model
    mean = model.mean_module
    assert torch.equal(mean.net[0].weight, prior.tensors["mean.net.0.weight"].to(mean.net[0].weight))
    assert not any(p.requires_grad for p in mean.net.parameters())
    assert mean.constant.requires_grad and mean.scale.requires_grad
    with torch.no_grad():
        z = model.extractor(model.train_inputs[0])
        f = mean.net(z[:, mean.columns]).squeeze(-1)
        residual = model.train_targets - mean(z)
    assert float(mean.scale.detach()) > 0 and abs(float(residual.mean())) < 1e-9  # least squares: centred residual
    assert abs(float(((f - f.mean()) * residual).sum())) < 1e-6  # ... and orthogonal to the prior's output
    ls = model.covar_module.base_kernel.lengthscale.detach().reshape(-1)
    width = prior.layout.width  # [lr, wd] slots, then mom (its own input), then the budget
    assert torch.allclose(ls[:width], prior.tensors["gp.lengthscale"].reshape(-1)[:width].to(ls))
    assert torch.allclose(ls[-1], prior.tensors["gp.lengthscale"].reshape(-1)[width].to(ls))
    assert abs(float(ls[width]) - math.log(2)) < 1e-6  # gpytorch's fresh lengthscale, softplus(0)
    a = dict(target.lineages[0].config, mom=0.0)
    b = dict(target.lineages[0].config, mom=1.0)
    za, zb = (model.extractor(torch.as_tensor(s._pack(target.candidate_rows([Candidate(c, 0)])))) for c in (a, b))
    assert not torch.equal(za, zb) and torch.equal(mean(za), mean(zb))


def test_a_prior_without_weights_serves_a_surrogate_with_them(prior_file) -> None:
    """The prior's mean reads the slots and the budget only; the fresh weight encoder's embedding
    goes to the kernel alone, with fresh lengthscales."""
    prior = load_prior(prior_file)
    s = GPSurrogate(SPACE_B.width, "flat", settings=FitSettings(full_steps=3, weight_steps=2), prior=prior,
                    space=SPACE_B)
    rows, y, keep = _task(SPACE_B, 6, 5).training_rows()
    s.fit(rows, y, keep=keep)
    model = s._model
    width = prior.layout.input_map(SPACE_B).width
    assert model.mean_module.columns.tolist() == [0, 1, width]  # the lr and wd slots, the budget
    assert model.extractor.dim == width + 1 + model.extractor.weights.dim
    mean, std = s.predict(rows)
    assert np.all(np.isfinite(mean)) and np.all(std > 0)


def test_the_unknown_input_is_learned_and_the_new_parameter_starts_neutral(deep_prior_file) -> None:
    """Deep kernel: the new parameter gets zero weight in the config MLP."""
    prior = load_prior(deep_prior_file)
    assert prior.tensors["extractor.unknown"].abs().max() > 1e-3  # moved from its zero start
    s = GPSurrogate(SPACE_B.width, None, settings=FitSettings(full_steps=0), prior=prior, space=SPACE_B)
    target = _task(SPACE_B, 6, 5)
    rows, y, keep = target.training_rows()
    s.fit(rows, y, keep=keep)
    ex = s._model.extractor
    first = ex.config_net[0].weight
    width = prior.layout.width
    assert torch.equal(first[:, :width], prior.tensors["extractor.config_net.0.weight"][:, :width].to(first))
    assert torch.all(first[:, width:-1] == 0)  # mom: zero weight until the study teaches it
    assert torch.equal(ex.unknown[:width], prior.tensors["extractor.unknown"].to(ex.unknown))
    # with zero fit steps the prediction does not depend on the new parameter
    a = dict(target.lineages[0].config, mom=0.0)
    b = dict(target.lineages[0].config, mom=1.0)
    from optuna_fms.engine import Candidate

    pa, _ = s.predict(target.candidate_rows([Candidate(a, 0)]))
    pb, _ = s.predict(target.candidate_rows([Candidate(b, 0)]))
    assert np.allclose(pa, pb)


# --- the file ----------------------------------------------------------------------------------


def test_the_file_is_safetensors_with_a_json_description(prior_file) -> None:
    from safetensors import safe_open

    with safe_open(str(prior_file), framework="pt") as fh:
        description = json.loads(fh.metadata()[HEADER_KEY])
        names = set(fh.keys())
    assert description["format"] == "optuna-fms-prior/2" and description["kernel"] == "input"
    assert [s["name"] for s in description["input"]["slots"]] == ["lr", "wd"]
    assert [s["name"] for s in description["trained_on"]] == ["a", "b"]
    assert set(description["tensors"]) == names and "torch" in description["versions"]
    assert prior_file.read_bytes().find(b"pickle") == -1


def _rewrite_header(src, dst, change) -> None:
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(src))
    meta, tensors = change(meta, tensors)
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize("case, message", [
    ("missing", "No prior file"),
    ("garbage", "not a readable safetensors file"),
    ("truncated", "not a readable safetensors file"),
    ("checkpoint", "not an optuna-fms prior"),
    ("format", "format 'optuna-fms-prior/0'"),
    ("tampered", "do not match the SHA-256"),
    ("reshaped", "has shape"),
])
def test_a_wrong_or_corrupt_prior_file_gets_a_clear_error(prior_file, tmp_path, case, message) -> None:
    bad = tmp_path / "bad.safetensors"
    if case == "garbage":
        bad.write_bytes(b"\x00not a prior at all" * 10)
    elif case == "truncated":
        bad.write_bytes(prior_file.read_bytes()[:-100])
    elif case == "checkpoint":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(3)}, str(bad))
    elif case == "format":
        def old(meta, tensors):
            d = json.loads(meta[HEADER_KEY])
            d["format"] = "optuna-fms-prior/0"
            return {HEADER_KEY: json.dumps(d)}, tensors
        _rewrite_header(prior_file, bad, old)
    elif case == "tampered":
        _rewrite_header(prior_file, bad, lambda m, t: (m, {**t, "gp.noise": t["gp.noise"] * 2}))
    elif case == "reshaped":
        _rewrite_header(prior_file, bad, lambda m, t: (m, {**t, "gp.noise": torch.zeros(2, dtype=t["gp.noise"].dtype)}))
    with pytest.raises(optuna_fms.PriorError, match=message):
        optuna_fms.FMSSampler(prior=bad)


def test_a_format_1_prior_is_read_as_the_deep_kernel_it_was(deep_prior_file, tmp_path) -> None:
    old = tmp_path / "old.safetensors"

    def as_format_1(meta, tensors):
        d = json.loads(meta[HEADER_KEY])
        d["format"] = "optuna-fms-prior/1"
        del d["kernel"]
        return {HEADER_KEY: json.dumps(d)}, tensors

    _rewrite_header(deep_prior_file, old, as_format_1)
    prior = load_prior(old)
    assert prior.kernel == "deep"
    s = GPSurrogate(SPACE_B.width, None, settings=FitSettings(full_steps=5), prior=prior, space=SPACE_B)
    rows, y, keep = _task(SPACE_B, 6, 5).training_rows()
    s.fit(rows, y, keep=keep)
    assert s.kernel == "deep" and s.ready


def test_an_incompatible_prior_is_refused_by_the_sampler(prior_file, deep_prior_file) -> None:
    with pytest.raises(optuna_fms.PriorError, match="without the learning curve branch|with the learning curve"):
        optuna_fms.FMSSampler(prior=deep_prior_file, use_learning_curve=False)
    with pytest.raises(optuna_fms.PriorError, match="trained without the learning curve branch"):
        optuna_fms.FMSSampler(prior=prior_file, use_learning_curve=True)
    with pytest.raises(TypeError, match="prior must be a path"):
        optuna_fms.FMSSampler(prior=3)
    with pytest.raises(TypeError, match="Unknown pretraining options"):
        optuna_fms.pretrain_surrogate([_task(SPACE_A, 4, 0)], prior_file.parent / "x.safetensors", stepz=3)


# --- Optuna studies ------------------------------------------------------------------------------

EPOCHS = 4
ARCH = optuna_fms.describe_architecture(make_model())
FAST = FitSettings(full_steps=40, refine_steps=5, weight_steps=10, weight_graphs=8)


def _study(storage, prior=None, weights="gmn", seed=0) -> optuna.Study:
    sampler = optuna_fms.FMSSampler(seed=seed, n_startup_trials=3, pool_size=32, weights=weights, prior=prior,
                                    fit_settings=FAST)
    study = optuna.create_study(direction="maximize", storage=storage, sampler=sampler,
                                pruner=optuna_fms.FMSPruner(max_steps=EPOCHS))
    for name, state in digits_task().pretrained.items():
        optuna_fms.register_pretrained(study, "model", name, state, architecture=ARCH)
    return study


def test_pretrain_on_a_finished_study_and_start_a_new_one_from_it(tmp_path) -> None:
    first = _study(f"sqlite:///{tmp_path / 'first.db'}")
    first.optimize(finetune_objective(EPOCHS, architecture=ARCH), n_trials=6)
    path = tmp_path / "prior.safetensors"
    described = optuna_fms.pretrain_surrogate([first], path, steps=20, weight_graphs=8)
    source = described["trained_on"][0]
    assert source["name"] == first.study_name and source["graphs"] > 0 and source["observations"] >= 6
    assert described["weights"] == "gmn"
    prior = load_prior(path)
    assert any(k.startswith("extractor.weights.net.") for k in prior.tensors)  # the metanetwork is in it
    second = _study(optuna.storages.InMemoryStorage(), prior=path)
    second.optimize(finetune_objective(EPOCHS, architecture=ARCH), n_trials=5)
    surrogate = second.sampler.policy._surrogate
    assert surrogate is not None and surrogate.prior is not None and surrogate.ready
    assert len(second.trials) == 5 and any(t.state == optuna.trial.TrialState.PRUNED for t in second.trials)
    # the same prior without weights in the new study: the "no weights" embedding is folded into the head
    third = _study(optuna.storages.InMemoryStorage(), prior=path, weights=None)
    third.optimize(finetune_objective(EPOCHS, architecture=ARCH), n_trials=4)
    assert third.sampler.policy._surrogate.ready


def test_without_a_prior_a_seeded_study_decides_as_before(monkeypatch) -> None:
    """No prior: the prior module is never used and the network has no 'unknown' input, so a
    seeded study makes the decisions it made before transfer existed (checked against the code
    of main at d8fe057 when this was written: same params and states, trial by trial)."""
    from optuna_fms.engine import layout, prior

    def untouchable(*args, **kwargs):
        raise AssertionError("the prior machinery ran without a prior")

    def run() -> list:
        study = optuna.create_study(direction="maximize",
                                    sampler=optuna_fms.FMSSampler(seed=3, n_startup_trials=3, pool_size=32,
                                                                  weights=None, fit_settings=FAST),
                                    pruner=optuna_fms.FMSPruner(max_steps=EPOCHS))
        study.optimize(finetune_objective(EPOCHS), n_trials=8)
        names = {n for n, _ in study.sampler.policy._surrogate._model.named_parameters()}
        assert not any("unknown" in n for n in names)
        return [(t.params, t.state, t.user_attrs.get("fms:decision")) for t in study.trials]

    reference = run()
    monkeypatch.setattr(layout.InputLayout, "input_map", untouchable)
    monkeypatch.setattr(prior.Prior, "warm_start", untouchable)
    assert run() == reference


@pytest.mark.parametrize("kernel", ["input", "deep"])
def test_a_prior_with_weights_serves_a_surrogate_without_them_exactly(kernel) -> None:
    """weights=None from a metanetwork prior: the head absorbs the learned "no weights" embedding,
    so it predicts what the full prior predicts for rows without weights (the input kernel's
    mean reads that embedding as a fixed input)."""
    from optuna_fms.graphs.build import build_graph

    graphs = {name: build_graph(state, ARCH) for name, state in digits_task().pretrained.items()}
    space = SearchSpace([LR, Dimension("model", "categorical", choices=("good", "weak"))])
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        config = {"lr": float(10 ** rng.uniform(-4, 0)), "model": ("good", "weak")[i % 2]}
        steps = list(range(1 + i % 4))
        records.append(LineageRecord(i, config, steps, [(0.9 if i % 2 == 0 else 0.3) * (s + 1) / 4 for s in steps]))
    # NOTE: "weak" rows start from no weights, so the prior learns its "no weights" embedding
    source = History(space, records, max_steps=4, graphs=graphs,
                     initial_weights=lambda c: "good" if c["model"] == "good" else None)
    prior = pretrain([source], weights="gmn", settings=PretrainSettings(steps=20, weight_graphs=2), kernel=kernel)
    assert prior.weights == "gmn" and prior.tensors["extractor.weights.missing"].abs().max() > 1e-3
    plain = History(space, records, max_steps=4)  # the same rows, no weights anywhere
    rows, y, keep = plain.training_rows()
    predictions = []
    for weights in ("gmn", None):
        s = GPSurrogate(space.width, weights, settings=FitSettings(full_steps=0), prior=prior, space=space)
        s.fit(rows, y, keep=keep)
        predictions.append(s.predict(rows))
    assert np.allclose(predictions[0][0], predictions[1][0], atol=1e-6)
    assert np.allclose(predictions[0][1], predictions[1][1], atol=1e-6)
    with pytest.raises(optuna_fms.PriorError, match="weights='gmn'; a surrogate with weights='flat'"):
        GPSurrogate(space.width, "flat", prior=prior, space=space)
