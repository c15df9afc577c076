"""GraphTemplate: one gather per checkpoint gives exactly build_graph's graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch

from optuna_fms.graphs import GraphMetanetwork, build_graph, describe_architecture
from optuna_fms.graphs.template import GraphTemplate

from test_graphs import ResNet, SelfAttention, TokenModel, cnn, encoder, mlp


def _trained_like(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Distinct values in every tensor, norm statistics included."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).abs() + 0.1 if "var" in k else torch.randn(v.shape, generator=g)
            for k, v in model.state_dict().items() if v.is_floating_point()}


GROUPED = lambda: nn.Sequential(  # noqa: E731
    nn.Conv1d(2, 4, 3, groups=2), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6),
    nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 3), nn.LayerNorm(3), nn.LayerNorm(3))


@pytest.mark.parametrize("factory", [mlp, cnn, ResNet, TokenModel, encoder, SelfAttention, GROUPED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_template_graph_equals_build_graph(factory, dtype) -> None:
    model = factory()
    arch = describe_architecture(model)
    template = GraphTemplate.of(arch, dtype=dtype)
    assert template is not None
    for seed in range(3):
        sd = _trained_like(model, seed)
        assert template.graph(sd).equals(build_graph(sd, arch, dtype=dtype))


def test_template_batch_matches_per_graph_batches() -> None:
    model = cnn()
    arch = describe_architecture(model)
    template = GraphTemplate.of(arch, dtype=torch.float64)
    sds = [_trained_like(model, s) for s in range(5)]
    fast = template.batch(sds)
    slow = Batch.from_data_list([build_graph(sd, arch, dtype=torch.float64).to_pyg() for sd in sds])
    for name in ("x", "edge_index", "edge_attr", "batch", "ptr"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert fast.num_graphs == 5
    net = GraphMetanetwork().double().eval()
    with torch.no_grad():
        assert torch.allclose(net(fast), net(slow), atol=1e-12)


def test_no_template_when_a_layer_is_coarsened() -> None:
    arch = describe_architecture(cnn())
    assert GraphTemplate.of(arch, coarsen=10_000) is not None
    assert GraphTemplate.of(arch, coarsen=100) is None  # the first conv has 216 weights


def test_bad_checkpoints_get_build_graphs_errors() -> None:
    model = cnn()
    arch = describe_architecture(model)
    template = GraphTemplate.of(arch)
    sd = dict(model.state_dict())
    sd["4.weight"] = torch.zeros(12, 8, 5, 5)
    with pytest.raises(ValueError, match=r"'4\.weight'.*\(12, 8, 5, 5\).*\(12, 8, 3, 3\)"):
        template.graph(sd)
    sd = dict(model.state_dict())
    sd["4.weight"] = torch.zeros(12, 72, 1, 1)  # same number of scalars, wrong shape
    with pytest.raises(ValueError, match="shape mismatch"):
        template.batch([model.state_dict(), sd])
    sd = dict(model.state_dict())
    sd["1.running_var"] = sd["1.running_var"].clone()
    sd["1.running_var"][3] = float("inf")
    with pytest.raises(ValueError, match=r"NaN.*'1\.running_var'"):
        template.graph(sd)
    sd = dict(model.state_dict())
    del sd["9.bias"]
    with pytest.raises(ValueError, match=r"'9\.bias'"):
        template.graph(sd)


def test_templated_builder_reuses_one_template_per_architecture() -> None:
    from optuna_fms.graphs.template import TemplatedBuilder

    builder = TemplatedBuilder(coarsen=300)  # the MLP (256 weights at most) fits, the CNN does not
    small, big = describe_architecture(mlp()), describe_architecture(cnn())
    sd = _trained_like(mlp(), 0)
    assert builder(sd, small).equals(build_graph(sd, small))
    assert builder.template(small) is builder.template(small)
    sd = _trained_like(cnn(), 1)
    assert builder.template(big) is None  # coarsened: built directly
    assert builder(sd, big).equals(build_graph(sd, big, coarsen=300))
