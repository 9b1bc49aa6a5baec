"""PNG figures of a bench run (matplotlib, the `bench` extra): latency CDFs, a per-request timeline, throughput over time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlc.errors import MlcError


def pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MlcError("--plot needs matplotlib", "pip install 'mlc[bench]' (or matplotlib)") from None
    return plt


def plot_run(rows: list[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """Write latency_cdf.png, timeline.png and throughput.png into out; return their paths."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in rows if r["success"]]
    paths = [out / "latency_cdf.png", out / "timeline.png", out / "throughput.png"]

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    series = {"TTFT": [r["ttft"] for r in ok], "TPOT": [r["tpot"] for r in ok if r["output_tokens"] > 1],
              "ITL": [g for r in ok for g in r["itl"]], "E2EL": [r["e2el"] for r in ok]}
    for ax, (name, values) in zip(axes, series.items()):
        v = np.sort(np.asarray(values, dtype=float)) * 1000
        if len(v):
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests (ITL: of gaps)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, max(3.0, min(12.0, 0.05 * len(rows) + 2))))
    for r in rows:
        y, t0 = r["index"], r["start"]
        if r["queued"]:
            ax.plot([t0 - r["queued"], t0], [y, y], color="0.75", lw=1.5)
        if not r["success"]:
            ax.plot([t0], [y], "x", color="red", ms=4)
            continue
        ax.plot([t0, t0 + r["ttft"]], [y, y], color="tab:orange", lw=1.5)
        ax.plot([t0 + r["ttft"], t0 + r["e2el"]], [y, y], color="tab:blue", lw=1.5)
    ax.plot([], [], color="0.75", label="waiting for a client slot")
    ax.plot([], [], color="tab:orange", label="sent, before the first token")
    ax.plot([], [], color="tab:blue", label="streaming")
    ax.plot([], [], "x", color="red", label="failed")
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel("request")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3.6))
    if ok:
        token_times = np.concatenate([r["start"] + r["ttft"] + np.concatenate([[0.0], np.cumsum(r["itl"])]) for r in ok])
        end = max(r["start"] + r["e2el"] for r in ok)
        edges = np.arange(0.0, end + 1.0, 1.0)
        counts, _ = np.histogram(token_times, bins=edges)
        ax.step(edges[:-1], counts, where="post", label="token messages per second")
        inflight = [sum(r["start"] <= t < r["start"] + r["e2el"] for r in ok) for t in edges[:-1]]
        ax2 = ax.twinx()
        ax2.step(edges[:-1], inflight, where="post", color="tab:green", label="requests in flight")
        ax2.set_ylabel("requests in flight")
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("seconds since the start")
    ax.set_ylabel("output tokens/s")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths
