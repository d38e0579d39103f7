"""A scaling model of the aggregation step: its network part from bare collectives, its CPU part from each
method's ranks, checked against scaling.py's measurements at every world size.

    aggregation(N) = max(network, cpu) + overlap * min(network, cpu)

    network(N) = all-reduces * latency_ar(N) + all-gathers * latency_ag(N) + bytes(N) / beta
        ring all-reduce of M bytes per rank:  bytes = 2 (N-1)/N * M,  hops = 2 (N-1)
        ring all-gather of M bytes per rank:  bytes = (N-1) * M,      hops = N-1
    cpu(N) = CPU time per rank and step * contention(N), contention(N) = max(1, N / cores) while N ranks share
             `cores` cores (the emulated cluster), 1 with a node per rank

latency(N) is a bare 4-byte collective's time at N ranks, beta the link's rate as a 1 MiB all-reduce and a
256 KiB all-gather see it (scaling.py times them at each world size with nothing else running): no method's run
is involved. Per method, M, the collectives per step (torch's hooks' all-reduce calls counted at
torch.distributed, this library's from its stats; an all-gather codec sends one all-gather per DDP bucket and
all-reduces the rest) and `overlap` come from its 2-rank run: overlap is the share of the shorter of network and
CPU that the step did not hide behind the longer (0 for plain all-reduce, whose CPU is Gloo moving the bytes; near
1 for a codec that must finish before its collective starts). The CPU time per rank is an input: as measured at
each N (on 2 shared cores it grows with N, from cache and scheduler effects this model does not predict), and, as
a stricter check, as measured at 2 ranks (an all-gather codec's decoding share times N - 1). The report gives the
error of every prediction beyond 2 ranks under both.

    python benchmarks/ddp/scaling_model.py benchmarks/results/scaling_100mbit.json --out benchmarks/results

It also extrapolates to 1,024 ranks at 0.1, 1, 10 and 100 Gbit/s with a node per rank: the hop cost from the 2- and
4-rank probes (the least contended: its slope per extra hop), CPU times as measured at 2 ranks and, for a GPU,
ASSUMED codec times (none measured: none for plain, 0.1 ms + the gradient's bytes at 1 TB/s per decoded message
for each method with a codec, about a quarter of an H200's memory bandwidth), and maps the method with the
shortest aggregation per (bandwidth, N).
"""

import argparse
import json
import os

import numpy as np

ALL_REDUCE, ALL_GATHER = "all-reduce", "all-gather"
GATHER_METHODS = ("qsgd", "co3", "casq")  # this library's all-gather codecs, by name prefix
GRADIENT_BYTES = 4 * 463_866  # ResNet-32 (10 classes, 1 input channel): float32 gradient bytes per step
# The probes of scaling.py: (small name, large name, large bytes per rank) per collective.
PROBES = {ALL_REDUCE: ("all_reduce_4B", "all_reduce_1MiB", 1 << 20),
          ALL_GATHER: ("all_gather_4B", "all_gather_256KiB", 1 << 18)}


def kind(method):
    return ALL_GATHER if method.startswith(GATHER_METHODS) else ALL_REDUCE


def hops(collective, n):
    return 2 * (n - 1) if collective == ALL_REDUCE else n - 1


def byte_factor(collective, n):
    """Bytes through one node's link per byte of its own message."""
    return 2 * (n - 1) / n if collective == ALL_REDUCE else n - 1


class Network:
    """Collective costs from the bare-collective probes: latency at each probed N, and for any other N the fixed
    cost plus hops(N) times the per-hop slope of the 2- and 4-rank probes; beta from the large probes."""

    def __init__(self, probes):
        self.by_n = {p["world"]: p for p in probes}
        rates = []
        for p in probes:
            for collective, (small, large, size) in PROBES.items():
                extra = 1e-3 * (p[large] - p[small])
                if extra > 0:
                    rates.append(byte_factor(collective, p["world"]) * size / extra)
        self.beta = float(np.median(rates))
        self.hop, self.fixed = {}, {}
        for collective, (small, _, _) in PROBES.items():
            ns = sorted(self.by_n)[:2]
            ts = [1e-3 * self.by_n[n][small] for n in ns]
            if len(ns) == 2:
                slope = max(0.0, (ts[1] - ts[0]) / (hops(collective, ns[1]) - hops(collective, ns[0])))
            else:
                slope = ts[0] / hops(collective, ns[0])
            self.hop[collective] = slope
            self.fixed[collective] = max(0.0, ts[0] - slope * hops(collective, ns[0]))

    def latency(self, collective, n, probed=True):
        if probed and n in self.by_n:
            return 1e-3 * self.by_n[n][PROBES[collective][0]]
        return self.fixed[collective] + hops(collective, n) * self.hop[collective]


class Model:
    def __init__(self, rows, probes, cores):
        self.cores = cores
        self.net = Network(probes)
        self.by = {(r["method"], r["world"]): r for r in rows}
        self.methods = list(dict.fromkeys(r["method"] for r in rows))
        two = {m: self.by[(m, 2)] for m in self.methods}
        buckets = two["plain"]["collectives"] if "plain" in two else 1  # plain: one all-reduce per DDP bucket
        self.m_bytes = {m: 1e3 * r["tx_kb_mean"] / byte_factor(kind(m), 2) for m, r in two.items()}
        self.gathers = {m: (r.get("buckets", buckets) if kind(m) == ALL_GATHER else 0) for m, r in two.items()}
        self.reduces = {m: max(0.0, r["collectives"] - self.gathers[m]) for m, r in two.items()}
        self.cpu2 = {m: 1e-3 * r["cpu_ms"] for m, r in two.items()}
        self.decode_share = {m: self._decode_share(r) for m, r in two.items()}
        self.overlap = {}
        for m, r in two.items():
            a, b = self.network(m, 2), self.cpu2[m]
            self.overlap[m] = min(1.0, max(0.0, (1e-3 * r["median_ms"] - max(a, b)) / max(min(a, b), 1e-9)))

    @staticmethod
    def _decode_share(row):
        c, d = row.get("compress_ms"), row.get("decompress_ms")
        return d / (c + d) if c is not None and d is not None and c + d > 0 else 0.0

    def network(self, method, n, beta=None, probed=True):
        collective = kind(method)
        return (self.reduces[method] * self.net.latency(ALL_REDUCE, n, probed)
                + self.gathers[method] * self.net.latency(ALL_GATHER, n, probed)
                + byte_factor(collective, n) * self.m_bytes[method] / (beta or self.net.beta))

    def cpu_from_2_ranks(self, method, n):
        c = self.cpu2[method]
        if kind(method) == ALL_GATHER:
            share = self.decode_share[method]
            c *= (1 - share) + share * (n - 1)
        return c

    def _combine(self, method, network, cpu):
        return max(network, cpu) + self.overlap[method] * min(network, cpu)

    def predict(self, method, n, measured_cpu=True):
        """On the emulated cluster: N ranks on `cores` cores."""
        row = self.by.get((method, n))
        cpu = 1e-3 * row["cpu_ms"] if measured_cpu and row else self.cpu_from_2_ranks(method, n)
        return self._combine(method, self.network(method, n), cpu * max(1.0, n / self.cores))

    def dedicated(self, method, n, beta=None, gpu=False):
        """A node per rank: no contention, the hop cost from the least contended probes."""
        cpu = gpu_time(method, n) if gpu else self.cpu_from_2_ranks(method, n)
        return self._combine(method, self.network(method, n, beta, probed=False), cpu)


def gpu_time(method, n):
    """ASSUMED per-rank codec time on a GPU (s): none for plain (NCCL moves the bytes by DMA, no host CPU), else
    0.1 ms + the float32 gradient's bytes at 1 TB/s, decoding N - 1 messages for an all-gather codec."""
    if method == "plain":
        return 0.0
    messages = n - 1 if kind(method) == ALL_GATHER else 1
    return 1e-4 + messages * GRADIENT_BYTES / 1e12


def validation_table(model, rows):
    lines = ["| method | ranks | measured ms | predicted ms | error | error, CPU from 2 ranks | network ms | "
             "CPU ms/rank | busy | overlap | bytes/node measured KB | predicted KB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    worst = [0.0, 0.0]
    for r in rows:
        m, n = r["method"], r["world"]
        pred, strict = 1e3 * model.predict(m, n), 1e3 * model.predict(m, n, measured_cpu=False)
        errs = [(p - r["median_ms"]) / r["median_ms"] for p in (pred, strict)]
        if n > 2:
            worst = [max(w, abs(e)) for w, e in zip(worst, errs)]
        kb = byte_factor(kind(m), n) * model.m_bytes[m] / 1e3
        lines.append(f"| {m} | {n} | {r['median_ms']:.1f} | {pred:.1f} | {100 * errs[0]:+.0f}% | "
                     f"{100 * errs[1]:+.0f}% | {1e3 * model.network(m, n):.1f} | {r['cpu_ms']:.1f} | "
                     f"{100 * r['machine_busy']:.0f}% | {model.overlap[m]:.2f} | {r['tx_kb_mean']:.1f} | {kb:.1f} |")
    return lines, worst


def extrapolation_table(model, ns=(16, 64, 256, 1024), gbits=(0.1, 1, 10, 100)):
    lines = ["| method | compute | " + " | ".join(f"{g} Gbit/s, {n} ranks" for g in gbits for n in ns) + " |",
             "|---|---|" + "---|" * (len(gbits) * len(ns))]
    for m in model.methods:
        for where in ("CPU", "GPU"):
            cells = [f"{1e3 * model.dedicated(m, n, g * 1e9 / 8 * 0.95, where == 'GPU'):.1f}"
                     for g in gbits for n in ns]
            lines.append(f"| {m} | {where} | " + " | ".join(cells) + " |")
    return lines


def targets(model, mbit):
    """The issue's targets at 16 ranks, as measured on the emulated cluster and as the model gives them for one
    node per rank."""
    if not {("gradiveq", 2), ("gradiveq", 16)} <= set(model.by):
        return []
    lines = [f"## Targets at 16 ranks, {mbit:g} Mbit/s per node", "",
             "| target | measured (2 cores shared) | model, one node per rank |", "|---|---|---|"]
    measured = {m: model.by[(m, 16)]["median_ms"] for m in model.methods if (m, 16) in model.by}
    dedicated = {m: 1e3 * model.dedicated(m, 16) for m in model.methods}
    g2_meas, g2_ded = model.by[("gradiveq", 2)]["median_ms"], 1e3 * model.dedicated("gradiveq", 2)

    def cell(value, bound):
        return f"{value:.2f} ({'met' if value <= bound else 'MISSED'})"
    lines.append(f"| GradiVeQ(16) / GradiVeQ(2) <= 1.3 | {cell(measured['gradiveq'] / g2_meas, 1.3)} | "
                 f"{cell(dedicated['gradiveq'] / g2_ded, 1.3)} |")
    for other, bound, text in (("qsgd4", 1 / 3, "GradiVeQ / QSGD 4-bit <= 0.33"),
                               ("powersgd2", 1.0, "GradiVeQ / PowerSGD rank 2 <= 1")):
        if other in measured:
            lines.append(f"| {text} | {cell(measured['gradiveq'] / measured[other], bound)} | "
                         f"{cell(dedicated['gradiveq'] / dedicated[other], bound)} |")
    return lines


def plots(model, rows, out_dir, tag):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ns = sorted({r["world"] for r in rows})
    for i, m in enumerate(model.methods):
        color = f"C{i % 10}"
        mine = [r for r in rows if r["method"] == m]
        ax.plot([r["world"] for r in mine], [r["median_ms"] for r in mine], "o", color=color, label=m)
        ax.plot(ns, [1e3 * model.predict(m, n) for n in ns], "-", color=color, alpha=0.6)
        ax.plot(ns, [1e3 * model.dedicated(m, n) for n in ns], ":", color=color, alpha=0.6)
    ax.set(yscale="log", xlabel="ranks", ylabel="aggregation per step (ms)",
           title="measured (dots), modelled (lines), one node per rank (dotted)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{tag}_vs_n.png"), dpi=120)
    region_plot(model, os.path.join(out_dir, f"{tag}_regions.png"))


def region_plot(model, path):
    import matplotlib.pyplot as plt
    gbits = np.logspace(-1, 2, 31)  # 0.1 .. 100 Gbit/s
    ns = [2 ** k for k in range(1, 11)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, where in zip(axes, ("CPU", "GPU (assumed codec)")):
        best = np.zeros((len(gbits), len(ns)), dtype=int)
        for i, g in enumerate(gbits):
            for j, n in enumerate(ns):
                times = [model.dedicated(m, n, g * 1e9 / 8 * 0.95, where != "CPU") for m in model.methods]
                best[i, j] = int(np.argmin(times))
        ax.imshow(best, origin="lower", aspect="auto", cmap="tab10", vmin=0, vmax=9,
                  extent=(0.5, len(ns) + 0.5, -1, 2))
        for idx in np.unique(best):
            cells = np.argwhere(best == idx)
            i, j = cells[len(cells) // 2]
            ax.text(j + 1, np.log10(gbits[i]), model.methods[idx], ha="center", va="center", fontsize=8)
        ax.set_xticks(range(1, len(ns) + 1), [str(n) for n in ns])
        ax.set(xlabel="ranks (one node each)", title=f"shortest aggregation, {where}")
    axes[0].set_yticks([-1, 0, 1, 2], ["0.1", "1", "10", "100"])
    axes[0].set_ylabel("link per node (Gbit/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("measurements", help="scaling.py's JSON")
    ap.add_argument("--out", default=".")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    args = ap.parse_args()
    with open(args.measurements) as f:
        data = json.load(f)
    if "probes" not in data or "cpu_ms" not in data["rows"][0]:
        raise SystemExit(f"{args.measurements}: no bare-collective probes or CPU times (written by an older "
                         f"scaling.py): rerun benchmarks/ddp/scaling.py")
    rows, mbit = data["rows"], data["args"]["mbit"]
    os.makedirs(args.out, exist_ok=True)
    model = Model(rows, data["probes"], args.cores)
    tag = os.path.splitext(os.path.basename(args.measurements))[0] + "_model"
    val, worst = validation_table(model, rows)
    lines = [f"# Scaling model against the emulated cluster ({mbit:g} Mbit/s per node)", "",
             f"Command: `python benchmarks/ddp/scaling_model.py {args.measurements} --cores {args.cores}`  ",
             f"From the bare collectives: beta {model.net.beta * 8 / 1e6:.1f} Mbit/s (link {mbit:g}); per hop "
             f"{1e6 * model.net.hop[ALL_REDUCE]:.0f} us (all-reduce) and {1e6 * model.net.hop[ALL_GATHER]:.0f} us "
             f"(all-gather) between the 2- and 4-rank probes. {args.cores} shared cores. Worst error beyond 2 "
             f"ranks: **{100 * worst[0]:.0f}%** with each N's measured CPU time per rank, {100 * worst[1]:.0f}% "
             f"with the 2-rank CPU time.", "",
             "Per method at 2 ranks: CPU ms per rank and step, all-reduces + all-gathers per step: "
             + ", ".join(f"{m} {1e3 * model.cpu2[m]:.1f}, {model.reduces[m]:g} + {model.gathers[m]:g}"
                         for m in model.methods),
             "", *val, "", *targets(model, mbit), "",
             "## Extrapolation: one node per rank (ms of aggregation per step)", "",
             "95% of the link rate; latency as the fixed cost plus the per-hop slope of the 2- and 4-rank probes; "
             "a ring for every collective (Gloo's; NCCL's trees would cut the latency term to about log2 N hops). "
             "CPU: each method's CPU time per rank as measured at 2 ranks; GPU: ASSUMED no host time for plain, "
             "0.1 ms + 1.86 MB at 1 TB/s per decoded message for each codec (the link model is the same).", "",
             *extrapolation_table(model), "",
             f"![measured and modelled]({tag}_vs_n.png)", "", f"![regions]({tag}_regions.png)"]
    with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plots(model, rows, args.out, tag)
    print("\n".join(lines[:6]))


if __name__ == "__main__":
    main()
