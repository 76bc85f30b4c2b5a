"""The layer-norm study (``normmatters reproduce layer-norm``): a small decoder-only character-level
transformer on a real local corpus, trained with each per-sample normalization in turn.

Variants: ``nn.LayerNorm`` against :class:`~normmatters.nn.LpLayerNorm` with l2 / l1 / linf / range, and
``nn.RMSNorm`` against :class:`~normmatters.nn.LpRMSNorm` with l1. Everything else (data order, initial
weights: same seed per variant) is identical. Reported per variant: validation bits per character
(mean cross-entropy / ln 2 on held-out text, mean ± std over seeds) and the step time relative to the stock
layer of the same kind (``nn.LayerNorm`` or ``nn.RMSNorm``), measured side by side: the variants of one
seed train round-robin, one step each in turn, so load on the machine hits them alike.

Corpus: by default the Python standard library's own ``.py`` files (``sysconfig.get_paths()["stdlib"]``),
or every readable UTF-8 text file under ``--corpus DIR``; files in sorted path order, concatenated, the last
10 % held out for validation. Characters are UTF-8 bytes (vocabulary 256; for mostly-ASCII text a byte is a
character), so "bits per character" is bits per byte.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layernorm import LpLayerNorm, LpRMSNorm

log = logging.getLogger(__name__)

#: variant name → (kind, norm or None for the stock layer); the baseline of a kind is its stock layer
VARIANTS: dict[str, tuple[str, str | None]] = {
    "nn.LayerNorm": ("layer", None),
    "LpLayerNorm l2": ("layer", "l2"),
    "LpLayerNorm l1": ("layer", "l1"),
    "LpLayerNorm linf": ("layer", "linf"),
    "LpLayerNorm range": ("layer", "range"),
    "nn.RMSNorm": ("rms", None),
    "LpRMSNorm l1": ("rms", "l1"),
}
_BASELINE = {"layer": "nn.LayerNorm", "rms": "nn.RMSNorm"}


@dataclass
class LayerNormStudy:
    corpus: Path | None = None  # None: the standard library's .py files
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    layers: int = 2
    width: int = 128
    heads: int = 4
    context: int = 128
    batch: int = 32
    lr: float = 3e-3
    eval_batches: int = 16
    max_chars: int = 4_000_000
    variants: tuple[str, ...] = field(default_factory=lambda: tuple(VARIANTS))


def make_norm(variant: str, width: int) -> nn.Module:
    kind, norm = VARIANTS[variant]
    if kind == "layer":
        return nn.LayerNorm(width) if norm is None else LpLayerNorm(width, norm=norm)
    return nn.RMSNorm(width) if norm is None else LpRMSNorm(width, norm=norm)


def read_corpus(folder: Path | None, max_chars: int) -> bytes:
    """The corpus as bytes: sorted files under ``folder`` (``*.py`` of the stdlib when None), up to max_chars."""
    if folder is None:
        root, pattern = Path(sysconfig.get_paths()["stdlib"]), "*.py"
    else:
        root, pattern = Path(folder), "*"
        if not root.is_dir():
            raise ValueError(f"layer-norm study: --corpus {folder} is not a folder")
    chunks, total = [], 0
    for path in sorted(root.rglob(pattern)):
        if total >= max_chars:
            break
        if not path.is_file() or "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable or not text
        chunks.append(data[: max_chars - total])
        total += len(chunks[-1])
    text = b"\n".join(chunks)
    if len(text) < 10_000:
        raise ValueError(f"layer-norm study: corpus {root} has only {len(text)} bytes of UTF-8 text "
                         f"(need at least 10000)")
    return text


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, variant: str) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = make_norm(variant, width), make_norm(variant, width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """Decoder-only pre-norm transformer over bytes: (B, T) int64 → (B, T, 256) logits."""

    def __init__(self, variant: str, layers: int, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads, variant) for _ in range(layers))
        self.norm = make_norm(variant, width)
        self.head = nn.Linear(width, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _batch(data: torch.Tensor, batch: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
    idx = start[:, None] + torch.arange(context + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def _val_bpc(model: nn.Module, val: torch.Tensor, study: LayerNormStudy) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(12345)
    losses = [_loss(model, *_batch(val, study.batch, study.context, gen)).item() for _ in range(study.eval_batches)]
    model.train()
    return statistics.fmean(losses) / math.log(2)


def run_layer_norm_study(study: LayerNormStudy) -> list[dict[str, Any]]:
    """One row per (variant, seed): val_bpc, step_ms (mean over steps) and the final train loss."""
    unknown = [v for v in study.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"layer-norm study: unknown variants {unknown}: expected some of {list(VARIANTS)}")
    data = torch.frombuffer(bytearray(read_corpus(study.corpus, study.max_chars)), dtype=torch.uint8)
    split = int(len(data) * 0.9)
    train, val = data[:split], data[split:]
    log.info("layer-norm study: %d train / %d validation bytes", len(train), len(val))
    rows = []
    for seed in study.seeds:
        models, opts, gens, times, last = {}, {}, {}, {}, {}
        for v in study.variants:
            torch.manual_seed(seed)
            models[v] = CharTransformer(v, study.layers, study.width, study.heads, study.context)
            opts[v] = torch.optim.AdamW(models[v].parameters(), lr=study.lr, weight_decay=0.01)
            gens[v] = torch.Generator().manual_seed(seed)
            times[v] = []
        sched = {v: torch.optim.lr_scheduler.OneCycleLR(opts[v], study.lr, total_steps=study.steps, pct_start=0.1)
                 for v in study.variants}
        for _ in range(study.steps):
            for v in study.variants:  # round-robin: side-by-side step times
                x, y = _batch(train, study.batch, study.context, gens[v])
                t0 = time.perf_counter()
                loss = _loss(models[v], x, y)
                opts[v].zero_grad(set_to_none=True)
                loss.backward()
                opts[v].step()
                times[v].append(time.perf_counter() - t0)
                sched[v].step()
                last[v] = loss.item()
        for v in study.variants:
            kind, norm = VARIANTS[v]
            skip = min(len(times[v]) // 10, 5)  # the first steps warm up allocators
            rows.append({"variant": v, "kind": kind, "norm": norm or "torch", "seed": seed,
                         "val_bpc": _val_bpc(models[v], val, study), "train_loss": last[v],
                         "step_ms": 1000 * statistics.fmean(times[v][skip:])})
            log.info("layer-norm study: seed %d %s val bpc %.4f", seed, v, rows[-1]["val_bpc"])
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: val bpc mean ± std over seeds, step-time ratio to the stock layer of its kind (mean over
    seeds of the per-seed ratio of mean step times)."""
    out = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]
        bpc = [r["val_bpc"] for r in rs]
        base = _BASELINE[rs[0]["kind"]]
        ratios = [r["step_ms"] / b["step_ms"] for r in rs for b in rows
                  if b["variant"] == base and b["seed"] == r["seed"]]
        out.append({"variant": v, "seeds": len(rs), "val_bpc_mean": statistics.fmean(bpc),
                    "val_bpc_std": statistics.stdev(bpc) if len(bpc) > 1 else 0.0,
                    "step_time_ratio": statistics.fmean(ratios) if ratios else float("nan"), "baseline": base})
    return out


def format_layer_norm_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'variant':<20} {'val bits/char':>18} {'step time':>10}  vs", "-" * 64]
    for s in summarize(rows):
        lines.append(f"{s['variant']:<20} {s['val_bpc_mean']:>9.4f} ± {s['val_bpc_std']:<6.4f} "
                     f"{s['step_time_ratio']:>9.3f}x  {s['baseline']}")
    return "\n".join(lines)


def write_layer_norm_report(study: LayerNormStudy, rows: list[dict[str, Any]], out: Path) -> Path:
    """results.csv (one row per variant and seed) and report.md (the summary table) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "kind", "norm", "seed", "val_bpc", "train_loss", "step_ms"])
        for r in rows:
            w.writerow([r["variant"], r["kind"], r["norm"], r["seed"], f"{r['val_bpc']:.6f}",
                        f"{r['train_loss']:.6f}", f"{r['step_ms']:.3f}"])
    corpus = "the Python standard library's .py files" if study.corpus is None else f"`{study.corpus}`"
    text = [
        "# Layer norm, RMS norm and their Lp versions in a small transformer",
        "",
        f"Decoder-only byte-level transformer ({study.layers} layers, width {study.width}, {study.heads} heads, "
        f"context {study.context}), AdamW lr {study.lr} one-cycle, batch {study.batch}, {study.steps} steps, "
        f"seeds {list(study.seeds)}, on {corpus} (last 10 % held out). Validation bits per character: "
        f"{study.eval_batches} fixed held-out batches. Step time: ratio to the stock layer of the same kind, "
        "variants trained round-robin (side by side); on a shared or loaded machine these ratios are noisy.",
        "",
        "| variant | val bits/char (mean ± std) | step time vs baseline | baseline |",
        "|---|---|---|---|",
    ]
    for s in summarize(rows):
        text.append(f"| {s['variant']} | {s['val_bpc_mean']:.4f} ± {s['val_bpc_std']:.4f} | "
                    f"{s['step_time_ratio']:.3f}x | {s['baseline']} |")
    text += ["", "The Lp layers here run on the plain PyTorch reference path (no fused kernels), so their step "
             "time includes that; `LpLayerNorm l2` is numerically `nn.LayerNorm`.", ""]
    (out / "report.md").write_text("\n".join(text))
    return out / "report.md"
