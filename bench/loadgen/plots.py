"""PNG figures of `semipd bench` / `semipd simulate` results, in the shape of semi-PD's figures: P90 and P99 TTFT,
P90 and P99 TPOT and SLO attainment versus request rate, one line per result document, the SLO targets dashed.

    plot_sweep([read_json("measured.json"), read_json("simulated.json")], "fig.png")

A document whose `simulated` is true is labelled "(simulated)" in the legend, always. A document with a single
rate is drawn as points (there is no line to draw), so one-rate runs still compare side by side."""
from __future__ import annotations

from pathlib import Path

PANELS = (   # (title, summary key, percentile, SLO key)
    ("P90 TTFT", "ttft_s", "p90", "ttft_s"),
    ("P99 TTFT", "ttft_s", "p99", "ttft_s"),
    ("P90 TPOT", "tpot_s", "p90", "tpot_s"),
    ("P99 TPOT", "tpot_s", "p99", "tpot_s"),
)


def legend_label(doc: dict) -> str:
    label = str(doc.get("label") or doc.get("tool") or "result")
    if doc.get("simulated") and "(simulated)" not in label:
        label += " (simulated)"
    return label


def _series(doc: dict, key: str, pct: str | None) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for run in sorted(doc.get("runs", []), key=lambda r: r["rate"]):
        s = run["summary"]
        value = s.get(key)
        if pct is not None:
            value = (value or {}).get(pct)
        if value is None:
            continue
        xs.append(run["rate"])
        ys.append(value * 1000.0 if pct is not None else value)   # latencies in ms
    return xs, ys


def plot_sweep(docs: list[dict], path: str | Path) -> Path:
    """Write one PNG with five panels (P90/P99 TTFT, P90/P99 TPOT in ms, SLO attainment) versus request rate.

    SLO targets (doc["slo"]) are dashed horizontal lines on the latency panels and the attainment goal on the
    attainment panel; when documents disagree on the targets, each one's is drawn in its own colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not docs:
        raise ValueError("plot_sweep needs at least one result document")
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "os^Dvx*P"
    panels = list(PANELS) + [("SLO attainment", "attainment", None, "attainment")]
    for i, doc in enumerate(docs):
        color = colors[i % len(colors)]
        label = legend_label(doc)
        style = "--" if doc.get("simulated") else "-"
        slo = doc.get("slo") or {}
        for ax, (title, key, pct, slo_key) in zip(axes, panels):
            xs, ys = _series(doc, key, pct)
            if len(xs) == 1:
                ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="none", color=color, markersize=8,
                        label=label)
            elif xs:
                ax.plot(xs, ys, style, marker=markers[i % len(markers)], color=color, markersize=4, label=label)
            target = slo.get(slo_key)
            if target is not None:
                same = all((d.get("slo") or {}).get(slo_key) == target for d in docs)
                if same and i > 0:
                    continue    # one shared target line, drawn once
                y = target * 1000.0 if pct is not None else target
                what = "goal" if pct is None else "SLO"
                ax.axhline(y, linestyle=":" if not same else "--", color="grey" if same else color, linewidth=1.2,
                           label=f"{what} {y:g}{'' if pct is None else ' ms'}" + ("" if same else f" ({label})"))
    for ax, (title, key, pct, _) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms" if pct is not None else "share of requests meeting the SLOs")
        if pct is None:
            ax.set_ylim(-0.02, 1.05)
        else:
            top = max([max(line.get_ydata()) for line in ax.get_lines() if len(line.get_ydata())] or [1.0])
            ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)   # room above the highest point or target line
        ax.grid(True, alpha=0.3)
    handles, labels = axes[-1].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes[:-1]:   # the targets of the latency panels join the attainment panel's legend entries
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(6, len(seen)),
               frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
