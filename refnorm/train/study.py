"""The micro-batch study: normalizers x per-device batch sizes, and what it says about the papers.

Every method is trained at every per-device batch size with gradient accumulation keeping the
update size fixed (so only the batch the normalizers' statistics see changes), on the same
data and seeds. The report (``report.md``) has

- a table of test accuracy, mean +- std over seeds, like the SN paper's Table 2 and the WS
  paper's Table 2;
- one sentence per claim of the papers, saying whether *this run* supports it:
  BN degrades at micro-batches, GN and SN stay robust, GN+WS matches large-batch BN, SN's
  learned ratios move away from BN as the batch shrinks, WN trains well but generalizes
  worse than BN;
- plots: accuracy vs batch size per method; SN's learned ratios per layer vs batch size (SN
  Fig. 4/5); train vs test accuracy of WN and BN per epoch (Gitman & Ginsburg Fig. 3).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refnorm.dispatch import process_choice, set_path
from refnorm.norms.switchable_norm import SCOPES
from refnorm.train.trainer import TrainConfig, train


@dataclass(frozen=True)
class StudyConfig:
    """The grid. A method is ``norm``, ``norm+weight`` or a weight method alone (``wn``)."""

    methods: tuple[str, ...] = ("bn", "gn", "sn", "gn+ws", "ln", "wn")
    batch_sizes: tuple[int, ...] = (2, 4, 16, 64)
    update_size: int = 64
    epochs: int = 6
    seeds: tuple[int, ...] = (0,)
    lr: float = 0.05
    data: str = "digits"
    train_subset: int | None = None
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        for b in self.batch_sizes:
            if self.update_size % b:
                raise ValueError(f"every batch size must divide update_size={self.update_size}; "
                                 f"got {b}")
        for m in self.methods:
            parse_method(m)


def parse_method(method: str) -> tuple[str, str | None]:
    """``"gn+ws"`` -> ("gn", "ws"); ``"wn"`` -> ("none", "wn"); ``"bn"`` -> ("bn", None)."""
    from refnorm.train.model import NORMS, WEIGHTS

    parts = method.split("+")
    if len(parts) == 1 and parts[0] in WEIGHTS:
        return "none", parts[0]
    norm, weight = parts[0], (parts[1] if len(parts) == 2 else None)
    if norm not in NORMS or weight not in WEIGHTS or len(parts) > 2:
        raise ValueError(f"unknown method {method!r}: use a normalizer ({', '.join(NORMS)}), "
                         f"optionally +ws/+wn/+np/+trelu, or a weight method alone")
    return norm, weight


# the grid of ``refnorm study --quick``
QUICK = StudyConfig(methods=("bn", "gn", "sn", "gn+ws", "wn"), batch_sizes=(2, 32),
                    update_size=32, epochs=3, train_subset=768)


def job_configs(study: StudyConfig) -> list[TrainConfig]:
    configs = []
    for method in study.methods:
        norm, weight = parse_method(method)
        for b in study.batch_sizes:
            for seed in study.seeds:
                configs.append(TrainConfig(
                    data=study.data, norm=norm, weight=weight, batch_size=b,
                    accumulation=study.update_size // b, epochs=study.epochs, lr=study.lr,
                    seed=seed, train_subset=study.train_subset, dtype=study.dtype,
                    device=study.device))
    return configs


def _run(config: TrainConfig) -> dict[str, Any]:
    started = time.perf_counter()
    result = train(config, progress=False)
    if result.interrupted:  # Ctrl-C stops the study, not only this run
        raise KeyboardInterrupt
    return {"config": dataclasses.asdict(config), "history": result.history,
            "seconds": time.perf_counter() - started}


def run_study(study: StudyConfig, out: str | Path, *, jobs: int | None = None,
              log=print) -> Path:
    """Train the grid, write ``report.md`` and the plots into ``out``; return the report path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = job_configs(study)
    jobs = jobs or min(len(configs), os.cpu_count() or 1)
    started = time.perf_counter()
    runs = []
    if jobs > 1:
        # forkserver, not fork: a process whose numba (OpenMP) threads have run cannot fork
        context = multiprocessing.get_context(
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                                 initargs=(process_choice(),)) as pool:
            for i, run in enumerate(pool.map(_run, configs), 1):
                runs.append(run)
                log(f"[{i}/{len(configs)}] {_label(run)}: test acc "
                    f"{run['history'][-1]['test_acc']:.3f} ({run['seconds']:.1f} s)")
    else:
        for i, config in enumerate(configs, 1):
            runs.append(_run(config))
            log(f"[{i}/{len(configs)}] {_label(runs[-1])}: test acc "
                f"{runs[-1]['history'][-1]['test_acc']:.3f} ({runs[-1]['seconds']:.1f} s)")
    elapsed = time.perf_counter() - started
    import json

    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    write_report(study, runs, out, elapsed)
    return out / "report.md"


def _worker_init(path: str | None) -> None:
    """A study worker: this process's path choice, and one thread (one job per core)."""
    set_path(path)
    _single_thread()


def _single_thread() -> None:
    """One thread per worker process: the study runs one job per core already."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"
    if "numba" in sys.modules:  # imported before the fork: its thread pool is already sized
        sys.modules["numba"].set_num_threads(1)


def _label(run: dict) -> str:
    c = run["config"]
    method = c["norm"] if c["weight"] is None else (
        c["weight"] if c["norm"] == "none" else f"{c['norm']}+{c['weight']}")
    return f"{method} b={c['batch_size']} seed={c['seed']}"


def _method(config: dict) -> str:
    if config["weight"] is None:
        return config["norm"]
    return config["weight"] if config["norm"] == "none" else f"{config['norm']}+{config['weight']}"


# -- the report ---------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (method, batch size): final test/train accuracies over seeds, SN ratios."""
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs:
        key = (_method(run["config"]), run["config"]["batch_size"])
        last = run["history"][-1]
        cell = cells.setdefault(key, {"test": [], "train": [], "ratios": [], "histories": []})
        cell["test"].append(last["test_acc"])
        cell["train"].append(last["train_acc"])
        cell["ratios"].append({k: v for k, v in last.items() if k.startswith("sn")})
        cell["histories"].append(run["history"])
    return cells


def _mean(xs) -> float:
    return float(np.mean(xs))


@dataclass(frozen=True)
class Claim:
    """One claim of the papers, read against this run."""

    claim: str  # what the paper says, with where
    supported: bool  # whether this run supports it, by the threshold stated in the evidence
    evidence: str  # the numbers behind the verdict


def claims(study: StudyConfig, cells: dict) -> list[Claim]:
    """The claims the grid can test (a claim whose cells the grid lacks is left out)."""
    small, large = min(study.batch_sizes), max(study.batch_sizes)
    acc = {k: _mean(v["test"]) * 100 for k, v in cells.items()}
    seeds = len(study.seeds)

    def have(*keys):
        return all(k in acc for k in keys)

    out: list[Claim] = []
    drop = {m: acc[(m, large)] - acc[(m, small)] for m in study.methods
            if have((m, large), (m, small))}
    if "bn" in drop:
        out.append(Claim(f"BN degrades when each device sees {small} samples (SN Table 2; "
                         "WS Table 2)",
                         drop["bn"] >= 2.0,
                         f"BN test accuracy {acc[('bn', large)]:.1f}% at batch {large} vs "
                         f"{acc[('bn', small)]:.1f}% at batch {small} (a drop of {drop['bn']:.1f} "
                         "points; 'supported' needs at least 2)"))
    for m in ("gn", "sn"):
        if m in drop and "bn" in drop:
            out.append(Claim(f"{m.upper()} stays robust at micro-batches where BN does not",
                             drop[m] < drop["bn"] and drop[m] < 2.0,
                             f"{m.upper()} drops {drop[m]:.1f} points from batch {large} to "
                             f"{small}, "
                             f"BN {drop['bn']:.1f} ('supported' needs less than BN and under 2)"))
    if have(("gn+ws", small), ("bn", large)):
        gap = acc[("gn+ws", small)] - acc[("bn", large)]
        out.append(Claim(f"GN+WS at batch {small} matches BN at batch {large} (WS Fig. 1, Table 2)",
                         gap >= -1.0,
                         f"GN+WS {acc[('gn+ws', small)]:.1f}% vs BN {acc[('bn', large)]:.1f}% "
                         f"(difference {gap:+.1f} points; 'supported' needs at least -1)"))
    if have(("sn", small), ("sn", large)):
        bn_small = _sn_bn_share(cells[("sn", small)]["ratios"])
        bn_large = _sn_bn_share(cells[("sn", large)]["ratios"])
        out.append(Claim("SN's learned ratios move away from BN as the batch shrinks (SN Fig. 4)",
                         bn_small < bn_large,
                         f"mean BN ratio over layers, means and variances: {bn_small:.2f} at batch "
                         f"{small} vs {bn_large:.2f} at batch {large}"))
    if have(("wn", large), ("bn", large)):
        wn, bn = cells[("wn", large)], cells[("bn", large)]
        wn_gap = (_mean(wn["train"]) - _mean(wn["test"])) * 100
        bn_gap = (_mean(bn["train"]) - _mean(bn["test"])) * 100
        trains = _mean(wn["train"]) * 100 >= _mean(bn["train"]) * 100 - 2.0
        out.append(Claim("WN trains about as well as BN but generalizes worse (Gitman & Ginsburg)",
                         trains and wn_gap > bn_gap,
                         f"at batch {large}: train accuracy WN "
                         f"{_mean(wn['train']) * 100:.1f}% vs BN "
                         f"{_mean(bn['train']) * 100:.1f}%, train-test gap WN {wn_gap:.1f} vs BN "
                         f"{bn_gap:.1f} points"))
    if seeds == 1:
        out = [dataclasses.replace(c, evidence=c.evidence + "; one seed: small differences are "
                                   "within run-to-run noise (use --seeds 3 for mean and std)")
               for c in out]
    return out


def _sn_bn_share(ratio_rows: list[dict]) -> float:
    values = [v for row in ratio_rows for k, v in row.items() if k.endswith("_bn")]
    return _mean(values) if values else float("nan")


def write_report(study: StudyConfig, runs: list[dict], out: Path, elapsed: float) -> None:
    cells = summarize(runs)
    subset = (f" (a random subset of {study.train_subset} training samples, drawn per seed)"
              if study.train_subset else "")
    lines = ["# Micro-batch study", "",
             f"Data `{study.data}`{subset}; "
             f"every update sees {study.update_size} samples (per-device batch x accumulation); "
             f"{study.epochs} epochs; lr {study.lr} (cosine); seeds {list(study.seeds)}; "
             f"{len(runs)} runs in {elapsed:.0f} s.", "",
             "## Test accuracy (%)", "",
             "| method | " + " | ".join(f"batch {b}" for b in study.batch_sizes) + " |",
             "|---|" + "---|" * len(study.batch_sizes)]
    for m in study.methods:
        row = []
        for b in study.batch_sizes:
            t = np.array(cells[(m, b)]["test"]) * 100
            row.append(f"{t.mean():.1f} ± {t.std():.1f}" if len(t) > 1 else f"{t.mean():.1f}")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    independent = [m for m in study.methods
                   if parse_method(m)[0] in ("none", "in", "ln", "gn")]
    if independent:
        lines += ["", f"{', '.join(independent)} never compute statistics across samples: with "
                  "accumulation keeping the update fixed, their runs at different batch sizes "
                  "are the same computation, so their rows are flat by construction (up to "
                  "float rounding in the order gradients are summed)."]
    lines += ["", "## The papers' claims, against this run", ""]
    for c in claims(study, cells):
        verdict = "**supported**" if c.supported else "**not supported**"
        lines.append(f"- {c.claim}: {verdict} by this run. {c.evidence}.")
    lines += ["", "## Plots", "",
              "![accuracy vs batch size](accuracy_vs_batch.png)", ""]
    plot_accuracy(study, cells, out / "accuracy_vs_batch.png")
    if any(m == "sn" for m in study.methods):
        plot_sn_ratios(study, cells, out / "sn_ratios.png")
        lines += ["![SN ratios per layer](sn_ratios.png)", ""]
    if "wn" in study.methods and "bn" in study.methods:
        plot_wn_vs_bn(study, cells, out / "wn_vs_bn.png")
        lines += ["![WN vs BN, train and test accuracy](wn_vs_bn.png)", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(study, cells, path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in study.methods:
        means = [_mean(cells[(m, b)]["test"]) * 100 for b in study.batch_sizes]
        stds = [float(np.std(cells[(m, b)]["test"])) * 100 for b in study.batch_sizes]
        ax.errorbar(study.batch_sizes, means, yerr=stds, marker="o", capsize=3, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(study.batch_sizes, [str(b) for b in study.batch_sizes])
    ax.set_xlabel("per-device batch size (what the normalizer's statistics see)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sn_ratios(study, cells, path) -> None:
    plt = _plt()
    rows = {b: cells[("sn", b)]["ratios"] for b in study.batch_sizes}
    layers = sorted({k.split("_")[0] for r in rows[study.batch_sizes[0]] for k in r})
    fig, axes = plt.subplots(2, len(layers), figsize=(3 * len(layers), 5), squeeze=False)
    width = 0.8 / len(study.batch_sizes)
    for j, layer in enumerate(layers):
        for i, kind in enumerate(("mean", "var")):
            ax = axes[i][j]
            for k, b in enumerate(study.batch_sizes):
                values = [_mean([r[f"{layer}_{kind}_{s}"] for r in rows[b]]) for s in SCOPES]
                ax.bar(np.arange(3) + k * width, values, width, label=f"batch {b}")
            ax.set_xticks(np.arange(3) + width * (len(study.batch_sizes) - 1) / 2, SCOPES)
            ax.set_ylim(0, 1)
            ax.set_title(f"SN layer {j + 1}, {'means' if kind == 'mean' else 'variances'}",
                         fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_wn_vs_bn(study, cells, path) -> None:
    plt = _plt()
    b = max(study.batch_sizes)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, color in (("bn", "tab:blue"), ("wn", "tab:orange")):
        history = cells[(m, b)]["histories"][0]
        epochs = [r["epoch"] for r in history]
        ax.plot(epochs, [r["train_acc"] * 100 for r in history], color=color, label=f"{m} train")
        ax.plot(epochs, [r["test_acc"] * 100 for r in history], color=color, linestyle="--",
                label=f"{m} test")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"batch {b}, seed {study.seeds[0]}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
