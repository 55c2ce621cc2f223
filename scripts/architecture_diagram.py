"""Draw docs/architecture.svg: a request's path through SpecRouter's processes, and the package layers.

    python scripts/architecture_diagram.py      # rewrites docs/architecture.svg (deterministic output)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "architecture.svg"
COLORS = {"client": "#e8eef7", "front": "#fdf1dc", "router": "#e3f2e1", "worker": "#f6e3e8", "layer": "#eeeeee"}


def box(ax, x, y, w, h, title, lines=(), color="#ffffff", size=9):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#444444", lw=1))
    ax.text(x + w / 2, y + h - 0.17, title, ha="center", va="top", fontsize=size + 1, fontweight="bold")
    for i, line in enumerate(lines):
        ax.text(x + w / 2, y + h - 0.52 - 0.27 * i, line, ha="center", va="top", fontsize=size - 1)


def arrow(ax, start, end, label="", both=False, offset=(0.0, 0.12), style="-"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="<|-|>" if both else "-|>", mutation_scale=11,
                                 lw=1.1, color="#333333", linestyle=style))
    if label:
        mx, my = (start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1]
        ax.text(mx, my, label, ha="center", va="bottom", fontsize=7.5, color="#222222")


def main() -> None:
    plt.rcParams["svg.hashsalt"] = "specrouter"  # stable ids: the file changes only when the drawing does
    plt.rcParams["svg.fonttype"] = "none"  # text stays text
    fig, ax = plt.subplots(figsize=(13, 7.2))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 7.2)
    ax.axis("off")

    # 1. clients
    box(ax, 0.2, 4.9, 2.1, 1.5, "Clients", ["curl, openai client", "(HTTP, SSE)", "specrouter.Client (gRPC)"], COLORS["client"])
    # 2. the front
    box(ax, 3.0, 4.5, 2.6, 2.3, "Front (serving/)", ["SpecRouterServer", "OpenAI HTTP (Ray Serve)", "public gRPC API",
                                                     "API keys, admission (429),", "deadlines, metrics"], COLORS["front"])
    # 3. the router actor
    box(ax, 6.3, 3.0, 3.1, 3.8, "RouterActor (Ray)", ["Frontend: text, chat template,", "stop strings",
                                                        "BatchServer thread", "BatchLoop: continuous batch",
                                                        "Engine: the chain step", "(draft, verify, commit)",
                                                        "AdaptiveRouter: chain and", "block lengths per step"], COLORS["router"])
    # 4. one worker actor per model
    workers = [("WorkerActor: drafter", ["e.g. qwen2.5-coder-0.5b", "KV cache per sequence"], 5.3),
               ("WorkerActor: target", ["e.g. qwen2.5-coder-1.5b", "KV cache per sequence", "+ skip-layer views"], 3.2)]
    for title, lines, y in workers:
        box(ax, 10.3, y, 2.5, 1.6 if len(lines) == 2 else 1.9, title, lines, COLORS["worker"])
    ax.text(11.55, 2.85, "ngram (prompt lookup) runs\nin the router: no model", ha="center", va="top", fontsize=8, style="italic")

    arrow(ax, (2.3, 5.65), (3.0, 5.65), "request", both=True)
    arrow(ax, (5.6, 5.65), (6.3, 5.65), "Ray stream", both=True)
    arrow(ax, (9.4, 6.1), (10.3, 6.1), "gRPC", both=True)
    arrow(ax, (9.4, 4.15), (10.3, 4.15), "gRPC", both=True)
    ax.text(9.85, 5.05, "data plane:\nversioned\nsequence\nstate", ha="center", va="center", fontsize=7.5, color="#222222")

    # 5. the layers
    layers = [("core/", "sampling, verification,\nsequence, models, workers,\nchain step, catalog"),
              ("tasks/", "corpora, encoders,\ntask discovery,\ndrafter alignment"),
              ("routing/", "profiler, acceptance,\nlatency model, classifier,\nrouter"),
              ("engine/", "Engine, BatchLoop,\nfrontend, detokenizer,\ncalibration"),
              ("runtime/", "Ray actors,\ngRPC data plane"),
              ("serving/", "HTTP + gRPC front,\nServe app, config,\nSDK, metrics")]
    ax.text(0.2, 2.35, "Package layers (each imports only those to its left)", fontsize=10, fontweight="bold", va="bottom")
    for i, (name, what) in enumerate(layers):
        x = 0.2 + i * 2.15
        ax.add_patch(FancyBboxPatch((x, 0.3), 1.95, 1.8, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    fc=COLORS["layer"], ec="#444444", lw=1))
        ax.text(x + 0.975, 1.95, name, ha="center", va="top", fontsize=10, fontweight="bold", family="monospace")
        ax.text(x + 0.975, 1.5, what, ha="center", va="top", fontsize=8)
        if i:
            arrow(ax, (x, 1.2), (x - 0.2, 1.2))

    OUT.parent.mkdir(exist_ok=True)
    fig.savefig(OUT, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    print(OUT)


if __name__ == "__main__":
    main()
