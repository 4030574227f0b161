#!/usr/bin/env python3
"""Draws the benchmark charts from results.csv (written by leaderz-bench): the chart,
and scaling.png beside it (many leases in one process: leases -> RSS, CPU, connections,
API-server CPU).

    python3 -m pip install matplotlib      # once
    python3 bench/plot.py bench/results/results.csv bench/results/chart.png
"""

import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

ORDER = [
    "leaderz",
    "client-go",
    "kube-lease-manager",
    "kube-leader-election",
    "kube-coordinate",
    "kubert-lease",
]
COLORS = {
    "leaderz": "#d62728",
    "client-go": "#1f77b4",
    "kube-lease-manager": "#2ca02c",
    "kube-leader-election": "#9467bd",
    "kube-coordinate": "#8c564b",
    "kubert-lease": "#ff7f0e",
}


def label(v, digits=2):
    """A bar label; no "-0.00" for a value that rounds to zero."""
    return f"{0.0 if abs(v) < 0.5 * 10 ** -digits else v:.{digits}f}"


def quantile(values, p):
    v = sorted(values)
    if not v:
        return None
    rank = p * (len(v) - 1)
    lo, hi = int(rank), min(int(rank) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (rank - lo)


def load(path):
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            row["value"] = float(row["value"]) if row["value"] else None
            rows.append(row)
    return rows


def params(param):
    return dict(kv.split("=", 1) for kv in param.split(";") if "=" in kv)


def peers_in(rows):
    seen = {r["peer"] for r in rows}
    return [p for p in ORDER if p in seen] + sorted(seen - set(ORDER) - {"apiserver"})


def trials(rows, scenario):
    out = defaultdict(list)
    for r in rows:
        if r["scenario"] == scenario and r["value"] is not None:
            out[r["peer"]].append(r["value"])
    return out


def by_n(rows, scenario):
    out = defaultdict(dict)
    for r in rows:
        if r["scenario"] == scenario and r["value"] is not None:
            out[r["peer"]][int(params(r["param"])["n"])] = r["value"]
    return out


def dot_plot(ax, data, peers, title, ylabel, zero_line=False):
    """Every trial as a dot, with p50 and p99 marks."""
    for i, peer in enumerate(peers):
        values = data.get(peer, [])
        if not values:
            ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
            continue
        xs = [i + (j % 5 - 2) * 0.06 for j in range(len(values))]
        ax.scatter(xs, values, s=12, alpha=0.6, color=COLORS.get(peer, "gray"))
        for p, style in ((0.5, "-"), (0.99, "--")):
            q = quantile(values, p)
            ax.hlines(q, i - 0.3, i + 0.3, colors="black", linestyles=style, linewidth=1)
    ax.set_xticks(range(len(peers)))
    ax.set_xticklabels(peers, rotation=25, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    if zero_line:
        ax.axhline(0, color="gray", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py results.csv chart.png")
    rows = load(sys.argv[1])
    # The lighter-leader runs (leaderz-renew-*) appear in the scaling chart only.
    peers = [p for p in peers_in(rows) if not p.startswith("leaderz-renew-")]
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))

    dot_plot(
        axes[0][0],
        trials(rows, "handover"),
        peers,
        "a. Handover after SIGTERM of the leader\n(solid: p50, dashed: p99)",
        "SIGTERM -> new holder (ms, log)",
    )
    axes[0][0].set_yscale("log")

    dot_plot(
        axes[0][1],
        trials(rows, "failover_overhead"),
        peers,
        "b. Failover after SIGKILL, minus the 3 s lease duration\n(solid: p50, dashed: p99)",
        "SIGKILL -> new holder - 3 s (ms)",
        zero_line=True,
    )

    ax = axes[0][2]
    totals = by_n(rows, "requests_total")
    for peer in peers:
        pts = sorted(totals.get(peer, {}).items())
        if pts:
            ax.plot(
                [n for n, _ in pts],
                [max(v, 0.01) for _, v in pts],
                marker="o",
                label=peer,
                color=COLORS.get(peer, "gray"),
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    sizes = sorted({n for v in totals.values() for n in v})
    ax.set_xticks(sizes)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("candidates on one Lease (N)", fontsize=9)
    ax.set_ylabel("lease requests/s at the API server (log)", fontsize=9)
    ax.set_title("c. API load in steady state (leader + followers)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    ax = axes[1][0]
    per_follower = by_n(rows, "requests_per_follower")
    leader = {p: v.get(1) for p, v in totals.items()}
    width = 0.38
    for i, peer in enumerate(peers):
        lv = leader.get(peer)
        fv = per_follower.get(peer, {})
        fmax = fv[max(fv)] if fv else None
        if lv is not None:
            ax.bar(i - width / 2, lv, width, color=COLORS.get(peer, "gray"))
            ax.text(i - width / 2, lv, label(lv), ha="center", va="bottom", fontsize=7)
        if fmax is not None:
            ax.bar(i + width / 2, fmax, width, color=COLORS.get(peer, "gray"), alpha=0.45, hatch="//")
            ax.text(i + width / 2, max(fmax, 0), label(fmax), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(peers)))
    ax.set_xticklabels(peers, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("lease requests/s", fontsize=9)
    ax.set_title("c. Leader alone (solid) vs. per follower at the largest N (hatched)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1][1]
    rss_leader = by_n(rows, "rss_leader")
    rss_follower = by_n(rows, "rss_follower_mean")
    for i, peer in enumerate(peers):
        lv = rss_leader.get(peer, {})
        fv = rss_follower.get(peer, {})
        n = 3 if 3 in lv else (min(lv) if lv else None)
        if n is None:
            continue
        ax.bar(i - width / 2, lv[n], width, color=COLORS.get(peer, "gray"))
        ax.text(i - width / 2, lv[n], f"{lv[n]:.1f}", ha="center", va="bottom", fontsize=7)
        if n in fv:
            ax.bar(i + width / 2, fv[n], width, color=COLORS.get(peer, "gray"), alpha=0.45, hatch="//")
            ax.text(i + width / 2, fv[n], f"{fv[n]:.1f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(6, color="red", linewidth=0.8, linestyle=":")
    ax.text(len(peers) - 0.5, 6, "6 MiB target", color="red", fontsize=7, ha="right", va="bottom")
    ax.set_xticks(range(len(peers)))
    ax.set_xticklabels(peers, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("VmRSS (MiB)", fontsize=9)
    ax.set_title("d. RSS per process at N=3: leader (solid), follower mean (hatched)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1][2]
    many = many_by_n(rows)
    shown = 1000 if any(1000 in v for v in many.values()) else None
    if shown is None:
        shown = max((n for v in many.values() for n in v), default=None)
    metrics = [
        ("many_rss", "RSS MiB"),
        ("many_cpu", "CPU %core"),
        ("many_requests_total", "lease req/s"),
        ("many_cpu_apiserver", "apiserver CPU %"),
        ("many_sockets", "connections"),
    ]
    names = [p for p in peers if shown in many.get(p, {})]
    if names:
        width = 0.8 / len(names)
        for j, peer in enumerate(names):
            values = [many[peer][shown].get(m) or 0 for m, _ in metrics]
            xs = [k + (j - (len(names) - 1) / 2) * width for k in range(len(metrics))]
            ax.bar(xs, values, width, color=COLORS.get(peer, "gray"), label=peer)
            for x, v in zip(xs, values):
                ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([label for _, label in metrics], fontsize=8)
        ax.set_title(f"e. {shown} leases in one process (all counts: scaling.png)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.set_axis_off()

    fig.suptitle("leaderz side by side: one kube-apiserver 1.34 + etcd on loopback", fontsize=12)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    scaling(rows, peers_in(rows), os.path.join(os.path.dirname(sys.argv[2]) or ".", "scaling.png"))


def many_by_n(rows):
    """peer -> n -> many_* scenario -> value."""
    out = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["scenario"].startswith("many_") and r["value"] is not None and "verb" not in r["param"]:
            out[r["peer"]][int(params(r["param"])["n"])][r["scenario"]] = r["value"]
    return out


def scaling(rows, peers, path):
    """Many leases in one process: leases -> RSS, CPU, connections, API-server CPU."""
    for p in peers:
        if p.startswith("leaderz-renew-"):
            COLORS.setdefault(p, "#e377c2")
    many = many_by_n(rows)
    names = [p for p in peers if many.get(p)]
    if not names:
        return
    panels = [
        ("many_rss", "process RSS (MiB)"),
        ("many_cpu", "process CPU (% of a core)"),
        ("many_sockets", "TCP connections to the API server"),
        ("many_cpu_apiserver", "kube-apiserver CPU (% of a core)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4.6))
    for ax, (metric, title) in zip(axes, panels):
        for peer in names:
            pts = sorted((n, v[metric]) for n, v in many[peer].items() if metric in v)
            if not pts:
                continue
            ax.plot(
                [n for n, _ in pts],
                [max(v, 0.5) for _, v in pts],
                marker="o",
                label=peer,
                color=COLORS.get(peer, "gray"),
            )
            for n, v in pts:
                lost = many[peer][n].get("many_lost")
                note = f"{v:.0f}" + (f"\n{lost:.0f} lost" if lost else "")
                ax.annotate(note, (n, max(v, 0.5)), fontsize=7, textcoords="offset points",
                            xytext=(0, 5), ha="center", color=COLORS.get(peer, "gray"))
        counts = sorted({n for p in names for n in many[p]})
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(counts)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("leases (one elector each) in one process", fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Many leases in one process: leaderz vs client-go (annotations: value, losses)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
