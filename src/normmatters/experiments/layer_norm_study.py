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

Emulated variants (``precisions``, ``scales``): the Lp layers of ``emulated`` (e.g. ``LpLayerNorm l1``) with
``precision=`` (:mod:`normmatters.precision.per_sample`: every intermediate of the normalization's forward
rounded to that format, backward straight-through in float32), their input multiplied by ``scale`` first
(``LpLayerNorm l1 fp16 x256``). A per-sample norm is invariant to that scale in exact arithmetic (up to eps),
so the factor only moves the activations within the format's range: in fp16 Σ(x − μ)² over n = 128 elements
overflows 65504 once the RMS of x − μ exceeds 22.6, and each square once |x − μ| > 255.9. Emulated variants
run for the seeds ``emulated_seeds`` (default: all), round-robin with the plain ones; their step time is the
emulator's cost (float64 arithmetic plus a rounding per operation), not that of real low-precision hardware.

Validation curves: every ``eval_every`` steps, bits per character on ``curve_batches`` fixed held-out batches.
The scale of the normalizations' inputs (RMS and max of |x − μ| over the norm sites on one held-out batch) is
recorded at the end of training, the measurement a scale factor is chosen from.
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

from ..atomic_write import atomic_open, atomic_write
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
#: the Lp layers that may run emulated: name → (kind, norm)
EMULATED: dict[str, tuple[str, str]] = {
    "LpLayerNorm l2": ("layer", "l2"),
    "LpLayerNorm l1": ("layer", "l1"),
    "LpLayerNorm linf": ("layer", "linf"),
    "LpLayerNorm range": ("layer", "range"),
    "LpRMSNorm l2": ("rms", "l2"),
    "LpRMSNorm l1": ("rms", "l1"),
}
PRECISIONS = ("fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2")


def variant_name(base: str, precision: str, scale: float) -> str:
    """``LpLayerNorm l1 fp16`` (scale 1) or ``LpLayerNorm l1 fp16 x256``."""
    return f"{base} {precision}" + ("" if scale == 1 else f" x{scale:g}")


def parse_variant(name: str) -> tuple[str, str | None, str | None, float]:
    """(kind, norm or None for the stock layer, precision or None, scale) of a variant name."""
    if name in VARIANTS:
        return (*VARIANTS[name], None, 1.0)
    for base, (kind, norm) in EMULATED.items():
        rest = name[len(base):].split() if name.startswith(base + " ") else []
        if rest and rest[0] in PRECISIONS and len(rest) <= 2:
            scale = 1.0
            if len(rest) == 2:
                try:
                    scale = float(rest[1][1:]) if rest[1].startswith("x") else math.nan
                except ValueError:
                    scale = math.nan
            if math.isfinite(scale) and scale > 0:
                return kind, norm, rest[0], scale
    raise ValueError(f"layer-norm study: unknown variant {name!r}: expected one of {list(VARIANTS)} or "
                     f"'<{' | '.join(EMULATED)}> <{' | '.join(PRECISIONS)}> [x<scale>]'")


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
    precisions: tuple[str, ...] = ()  # emulated variants: each of ``emulated`` × precision × scale
    scales: tuple[float, ...] = (1.0,)
    emulated: tuple[str, ...] = field(default_factory=lambda: tuple(EMULATED))
    emulated_seeds: tuple[int, ...] | None = None  # None: every seed
    eval_every: int = 25
    curve_batches: int = 4

    def all_variants(self, seed: int) -> tuple[str, ...]:
        """The plain variants, then (for the emulated seeds) the emulated ones."""
        if self.emulated_seeds is not None and seed not in self.emulated_seeds:
            return tuple(self.variants)
        return tuple(self.variants) + tuple(variant_name(b, p, s) for p in self.precisions for s in self.scales
                                            for b in self.emulated)


class Scaled(nn.Module):
    """``norm(scale · x)``: moves the normalization's input within a format's range (the output is the same
    in exact arithmetic, up to eps)."""

    def __init__(self, norm: nn.Module, scale: float) -> None:
        super().__init__()
        self.norm, self.scale = norm, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x * self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


def make_norm(variant: str, width: int) -> nn.Module:
    kind, norm, precision, scale = parse_variant(variant)
    if kind == "layer":
        m = nn.LayerNorm(width) if norm is None else LpLayerNorm(width, norm=norm, precision=precision)
    else:
        m = nn.RMSNorm(width) if norm is None else LpRMSNorm(width, norm=norm, precision=precision)
    return m if scale == 1 else Scaled(m, scale)


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

    def norm_sites(self) -> list[nn.Module]:
        return [m for b in self.blocks for m in (b.norm1, b.norm2)] + [self.norm]

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
def _val_bpc(model: nn.Module, val: torch.Tensor, study: LayerNormStudy, batches: int | None = None) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(12345)
    losses = [_loss(model, *_batch(val, study.batch, study.context, gen)).item()
              for _ in range(study.eval_batches if batches is None else batches)]
    model.train()
    return statistics.fmean(losses) / math.log(2)


@torch.no_grad()
def activation_scale(model: CharTransformer, x: torch.Tensor) -> tuple[float, float]:
    """(mean over norm sites of the RMS of x − μ, max over sites of max |x − μ|) of the normalizations'
    inputs (before any ``Scaled`` factor) on the batch ``x``; μ is the per-token mean."""
    seen: list[tuple[float, float]] = []

    def hook(module, args):
        d = args[0] - args[0].mean(-1, keepdim=True)
        seen.append((d.square().mean().sqrt().item(), d.abs().max().item()))

    handles = [m.register_forward_pre_hook(hook) for m in model.norm_sites()]
    try:
        model.eval()
        model(x)
    finally:
        model.train()
        for h in handles:
            h.remove()
    return statistics.fmean(r for r, _ in seen), max(m for _, m in seen)


def run_layer_norm_study(study: LayerNormStudy) -> list[dict[str, Any]]:
    """One row per (variant, seed): val_bpc, step_ms (mean over steps), the final train loss, the validation
    ``curve`` [(step, bpc)] and the activation scale (``act_rms``, ``act_max``)."""
    unknown = [v for v in study.variants if v not in VARIANTS]
    unknown += [v for v in study.emulated if v not in EMULATED] + [p for p in study.precisions if p not in PRECISIONS]
    if unknown or not all(s > 0 for s in study.scales) or study.eval_every < 1:
        raise ValueError(f"layer-norm study: unknown variants {unknown} or bad scales {study.scales} / "
                         f"eval_every {study.eval_every}: expected variants of {list(VARIANTS)}, emulated of "
                         f"{list(EMULATED)}, precisions of {list(PRECISIONS)}, positive scales")
    data = torch.frombuffer(bytearray(read_corpus(study.corpus, study.max_chars)), dtype=torch.uint8)
    split = int(len(data) * 0.9)
    train, val = data[:split], data[split:]
    log.info("layer-norm study: %d train / %d validation bytes", len(train), len(val))
    probe = _batch(val, study.batch, study.context, torch.Generator().manual_seed(54321))[0]
    rows = []
    for seed in study.seeds:
        variants = study.all_variants(seed)
        models, opts, gens, times, last, curves = {}, {}, {}, {}, {}, {}
        for v in variants:
            torch.manual_seed(seed)
            models[v] = CharTransformer(v, study.layers, study.width, study.heads, study.context)
            opts[v] = torch.optim.AdamW(models[v].parameters(), lr=study.lr, weight_decay=0.01)
            gens[v] = torch.Generator().manual_seed(seed)
            times[v], curves[v] = [], []
        sched = {v: torch.optim.lr_scheduler.OneCycleLR(opts[v], study.lr, total_steps=study.steps, pct_start=0.1)
                 for v in variants}
        for step in range(1, study.steps + 1):
            for v in variants:  # round-robin: side-by-side step times
                x, y = _batch(train, study.batch, study.context, gens[v])
                t0 = time.perf_counter()
                loss = _loss(models[v], x, y)
                opts[v].zero_grad(set_to_none=True)
                loss.backward()
                opts[v].step()
                times[v].append(time.perf_counter() - t0)
                sched[v].step()
                last[v] = loss.item()
                if step % study.eval_every == 0 or step == study.steps:
                    curves[v].append((step, _val_bpc(models[v], val, study, study.curve_batches)))
            if step % study.eval_every == 0:
                log.info("layer-norm study: seed %d step %d/%d", seed, step, study.steps)
        for v in variants:
            kind, norm, precision, scale = parse_variant(v)
            skip = min(len(times[v]) // 10, 5)  # the first steps warm up allocators
            act_rms, act_max = activation_scale(models[v], probe)
            rows.append({"variant": v, "kind": kind, "norm": norm or "torch", "precision": precision or "native",
                         "scale": scale, "seed": seed, "val_bpc": _val_bpc(models[v], val, study),
                         "train_loss": last[v], "step_ms": 1000 * statistics.fmean(times[v][skip:]),
                         "act_rms": act_rms, "act_max": act_max, "curve": curves[v]})
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
    w = max([20] + [len(r["variant"]) for r in rows])
    lines = [f"{'variant':<{w}} {'val bits/char':>18} {'step time':>10}  vs", "-" * (w + 44)]
    for s in summarize(rows):
        lines.append(f"{s['variant']:<{w}} {s['val_bpc_mean']:>9.4f} ± {s['val_bpc_std']:<6.4f} "
                     f"{s['step_time_ratio']:>9.3f}x  {s['baseline']}")
    return "\n".join(lines)


def write_layer_norm_report(study: LayerNormStudy, rows: list[dict[str, Any]], out: Path,
                            command: str | None = None) -> Path:
    """results.csv (one row per variant and seed), curves.csv, the curve plots
    (:mod:`normmatters.experiments.layer_norm_plots`) and report.md (the summary table) in ``out``."""
    from .layer_norm_plots import plot_curves, write_curves_csv

    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "results.csv") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "kind", "norm", "precision", "scale", "seed", "val_bpc", "train_loss", "step_ms",
                    "act_rms", "act_max"])
        for r in rows:
            w.writerow([r["variant"], r["kind"], r["norm"], r["precision"], f"{r['scale']:g}", r["seed"],
                        f"{r['val_bpc']:.6f}", f"{r['train_loss']:.6f}", f"{r['step_ms']:.3f}",
                        f"{r['act_rms']:.4f}", f"{r['act_max']:.4f}"])
    write_curves_csv(rows, out / "curves.csv")
    plots = plot_curves(rows, out)
    corpus = "the Python standard library's .py files" if study.corpus is None else f"`{study.corpus}`"
    emulated = any(r["precision"] != "native" for r in rows)
    text = [
        "# Layer norm, RMS norm and their Lp versions in a small transformer",
        "",
        f"Decoder-only byte-level transformer ({study.layers} layers, width {study.width}, {study.heads} heads, "
        f"context {study.context}), AdamW lr {study.lr} one-cycle, batch {study.batch}, {study.steps} steps, "
        f"seeds {list(study.seeds)}, on {corpus} (last 10 % held out). Validation bits per character: "
        f"{study.eval_batches} fixed held-out batches (curves: {study.curve_batches} batches every "
        f"{study.eval_every} steps). Step time: ratio to the stock layer of the same kind, "
        "variants trained round-robin (side by side); on a shared or loaded machine these ratios are noisy.",
        "",
    ]
    if command:
        text += [f"Command: `{command}`", ""]
    if emulated:
        text += [f"Emulated rows (seeds {list(study.emulated_seeds or study.seeds)}): the normalization's forward "
                 "with every intermediate rounded to the named format (fp8: element-wise values in fp8, sums and "
                 "statistics in fp16), backward straight-through in float32; `xS`: the normalization's input "
                 "multiplied by S first. Their step time is the cost of the emulator (float64 arithmetic and a "
                 "rounding per operation), not of low-precision hardware.", ""]
    text += ["| variant | seeds | val bits/char (mean ± std) | step time vs baseline | baseline "
             "| input RMS / max of x − μ |", "|---|---|---|---|---|---|"]
    for s in summarize(rows):
        rs = [r for r in rows if r["variant"] == s["variant"]]
        act = f"{statistics.fmean(r['act_rms'] for r in rs):.2f} / {max(r['act_max'] for r in rs):.1f}"
        text.append(f"| {s['variant']} | {s['seeds']} | {s['val_bpc_mean']:.4f} ± {s['val_bpc_std']:.4f} | "
                    f"{s['step_time_ratio']:.3f}x | {s['baseline']} | {act} |")
    text += ["", "Input RMS / max: of the normalizations' inputs (before any xS factor) at the end of training, "
             "mean RMS over the norm sites and the largest |x − μ| on one held-out batch.",
             "", "The Lp layers here run on the plain PyTorch reference path (no fused kernels), so their step "
             "time includes that; `LpLayerNorm l2` is numerically `nn.LayerNorm`.", ""]
    text += ["Validation curves (mean over seeds, min–max band):", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    atomic_write(out / "report.md", "\n".join(text) + "\n")
    return out / "report.md"
