#!/usr/bin/env python3
"""Draws the headline figures of a bench run (the JSON mqtls-bench writes) as one PNG."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["mqtls", "stunnel", "haproxy", "socat", "direct"]
COLOURS = {"mqtls": "#d62728", "stunnel": "#7f7f7f", "haproxy": "#1f77b4", "socat": "#bcbd22", "direct": "#2ca02c"}


def get(d, *path):
    for p in path:
        if isinstance(d, dict) and p in d:
            d = d[p]
        elif isinstance(d, list) and isinstance(p, int) and p < len(d):
            d = d[p]
        else:
            return None
    return d if isinstance(d, (int, float)) else None


def mem_at(c, n):
    for p in (c.get("memory") or {}).get("points", []):
        if p.get("n") == n:
            return p.get("pss_kib_per_conn")
    return None


def main(src, dst):
    data = json.load(open(src))
    cs = data["contenders"]
    plan = data["meta"]["plan"]
    n_max = max(plan["memory_n"]) if plan.get("memory_n") else None
    plain = get(data, "plain_tcp", "throughput", "mb_per_s")
    plain_text = f"; plain TCP: {plain:,.0f}" if plain is not None else ""
    panels = [
        (f"Memory per idle connection\n(KiB, N = {n_max:,}; lower is better)", lambda c: mem_at(c, n_max), True),
        ("QoS 1 round trip, 32 B, p50\n(µs; lower is better)", lambda c: get(c, "latency", "32", "p50_us"), False),
        ("Latency added vs direct TLS, 32 B, p50\n(µs, interleaved; lower is better)",
         lambda c: get(c, "latency", "32", "added_p50_us"), False),
        (f"Setup rate with session resumption\n({plan['setup_in_flight']} in flight; conn/s; higher is better)",
         lambda c: get(c, "setup", "per_second"), False),
        (f"Setup rate without session resumption\n({plan['setup_in_flight']} in flight; conn/s; higher is better)",
         lambda c: get(c, "setup_no_resumption", "per_second"), False),
        (f"Reconnect storm, {plan['storm_devices']:,} devices\n(s until all connected; lower is better)",
         lambda c: get(c, "storm", "all_connected_s"), False),
        (f"Bulk throughput to a TLS sink\n(MB/s; higher is better{plain_text})",
         lambda c: get(c, "throughput", "mb_per_s"), False),
        ("CPU per million 32 B messages\n(CPU s; lower is better)", lambda c: get(c, "cpu", "cpu_s_per_million"), False),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(17, 8.5))
    axes = axes.flatten()
    for ax, (title, f, log) in zip(axes, panels):
        names, values = [], []
        for k in ORDER:
            if k in cs:
                v = f(cs[k])
                if v is not None:
                    names.append(k)
                    values.append(v)
        bars = ax.bar(names, values, color=[COLOURS[n] for n in names])
        for b, v in zip(bars, values):
            label = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}" if abs(v) >= 1 else f"{v:.2f}"
            ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        if log and values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        if not values:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    meta = data["meta"]
    fig.suptitle(f"mqtls benchmark, {meta.get('date', '')}, commit {meta.get('commit', '')}: "
                 f"{meta.get('cpus', '?')} CPUs, loopback, upstream Mosquitto with mutual TLS, "
                 "one client certificate for all", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"chart: {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
