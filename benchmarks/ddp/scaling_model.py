"""A scaling model of the aggregation step, calibrated at 2 ranks and checked against scaling.py's measurements.

    aggregation(N) = (codec + hops(N) * per-hop cost) * contention(N) + bytes(N) / bandwidth

    ring all-reduce of M bytes per rank:  bytes = 2 (N-1)/N * M,  hops = 2 (N-1)
    all-gather of M bytes per rank:       bytes = (N-1) * M,      hops = N-1

An all-gather codec decodes N - 1 messages, so the decoding part of its codec time (this library's quantizers
report encode and decode times) grows as N - 1 (codec_growth). Per method, M is what
each node put on its link per step at 2 ranks (where both collectives send M), and the
collectives are: one all-reduce (plain, bf16), three all-reduces in a row (PowerSGD: the uncompressed tensors, P,
then Q), two all-reduces (GradiVeQ: coefficients and raw values / control), one all-gather (QSGD, CO3, CASQ).
The bandwidth (the link's rate less TCP/IP overhead) and the software cost of one message hop are two constants
for every method, fitted over all measurements; codec is the rest of each method's 2-rank step. On the emulated
cluster N ranks share this machine's cores, so the CPU parts grow as contention(N) = N / cores there; on a real
cluster each rank has its own cores, contention is 1, and the extrapolation below uses that.

    python benchmarks/ddp/scaling_model.py benchmarks/results/scaling_100mbit.json --out benchmarks/results

It writes the model's predictions next to the measurements (the error of each), an extrapolation to 1,024
ranks at 1, 10 and 100 Gbit/s with CPU codec times (as measured at 2 ranks, one core each) and GPU codec times
(ASSUMED, none measured: 0.1 ms + the gradient's bytes / 1 TB/s per method that has a codec, about a quarter of
an H200's memory bandwidth), and a map of the method with the shortest aggregation per (bandwidth, N).
"""

import argparse
import json
import os

ALL_REDUCE, ALL_GATHER = "all-reduce", "all-gather"
# (collective kind, number of collectives in a row) per method family.
COLLECTIVES = {"plain": (ALL_REDUCE, 1), "bf16": (ALL_REDUCE, 1), "fp16": (ALL_REDUCE, 1),
               "powersgd": (ALL_REDUCE, 3), "gradiveq": (ALL_REDUCE, 2), "qsgd4": (ALL_GATHER, 1),
               "co3": (ALL_GATHER, 1), "casq2": (ALL_GATHER, 1), "casq3": (ALL_GATHER, 1)}
GRADIENT_BYTES = 4 * 463_866  # ResNet-32 (10 classes, 1 input channel): float32 gradient bytes per step


def family(method):
    for prefix in ("powersgd", "gradiveq"):
        if method.startswith(prefix):
            return prefix
    return method


def collective_bytes_time(kind, n, m_bytes, bandwidth):
    """Seconds the link takes for one node's share of a collective of m_bytes per rank (hops counted apart)."""
    if kind == ALL_REDUCE:
        return 2 * (n - 1) / n * m_bytes / bandwidth
    return (n - 1) * m_bytes / bandwidth


def hops(method, n):
    kind, count = COLLECTIVES[family(method)]
    return count * (2 * (n - 1) if kind == ALL_REDUCE else n - 1)


def codec_growth(method, n, decode_share):
    """An all-gather codec encodes one message and decodes N - 1 (one at 2 ranks), so the decoding share of its
    2-rank codec time grows as N - 1. A summable one encodes and decodes once, whatever N."""
    if COLLECTIVES[family(method)][0] != ALL_GATHER:
        return 1.0
    return (1 - decode_share) + decode_share * (n - 1)


def wire_time(method, n, m_bytes, bandwidth):
    """The step's bytes through one node's link; m_bytes is its total per node at 2 ranks."""
    return collective_bytes_time(COLLECTIVES[family(method)][0], n, m_bytes, bandwidth)


class Model:
    """aggregation(N) = (codec + hops(N) * per-hop cost) * contention(N) + bytes(N) / bandwidth, where the per-hop
    cost is the software's (Gloo, TCP) for one message and contention(N) = max(1, N / cores) while N ranks share
    the machine's cores (1 on a real cluster). Bandwidth and per-hop cost are fitted over all measurements (grid
    search, least worst relative error); codec is each method's 2-rank step less the rest."""

    def __init__(self, rows, mbit, cores):
        self.cores, self.rows = cores, rows
        self.by = {(r["method"], r["world"]): r for r in rows}
        self.methods = list(dict.fromkeys(r["method"] for r in rows))
        self.m_bytes = {m: 1e3 * self.by[(m, 2)]["tx_kb_mean"] for m in self.methods}
        # The decoding share of each codec at 2 ranks, where the method reports it (this library's), else 0.
        self.decode_share = {}
        for m in self.methods:
            r = self.by[(m, 2)]
            c, d = r.get("compress_ms"), r.get("decompress_ms")
            self.decode_share[m] = d / (c + d) if c is not None and d is not None and c + d > 0 else 0.0
        link = mbit * 1e6 / 8
        candidates = [(link * f / 100, 1e-5 * a) for f in range(70, 111) for a in range(0, 80)]
        self.worst, self.bandwidth, self.latency = min((self._worst(b, a), b, a) for b, a in candidates)
        self.codec2 = self._codecs(self.bandwidth, self.latency)

    def _codecs(self, bandwidth, latency):
        return {m: max(0.0, 1e-3 * self.by[(m, 2)]["median_ms"] - wire_time(m, 2, self.m_bytes[m], bandwidth)
                       - hops(m, 2) * latency) for m in self.methods}

    def _worst(self, bandwidth, latency):
        codec2 = self._codecs(bandwidth, latency)
        errs = [abs(self._time(r["method"], r["world"], bandwidth, latency, codec2[r["method"]], True)
                    / (1e-3 * r["median_ms"]) - 1) for r in self.rows if r["world"] > 2]
        return max(errs) if errs else 0.0

    def _time(self, method, n, bandwidth, latency, codec, shared_cores):
        contention = max(1.0, n / self.cores) if shared_cores else 1.0
        growth = codec_growth(method, n, self.decode_share[method])
        return ((codec * growth + hops(method, n) * latency) * contention
                + wire_time(method, n, self.m_bytes[method], bandwidth))

    def predict(self, method, n, bandwidth=None, shared_cores=True, codec=None):
        c = self.codec2[method] if codec is None else codec
        return self._time(method, n, bandwidth or self.bandwidth, self.latency, c, shared_cores)


def gpu_codec(method):
    """ASSUMED GPU codec time (s): none for plain, else 0.1 ms + the float32 gradient's bytes at 1 TB/s."""
    return 0.0 if method == "plain" else 1e-4 + GRADIENT_BYTES / 1e12


def validation_table(model, rows):
    lines = ["| method | ranks | measured ms | predicted ms | error |", "|---|---|---|---|---|"]
    worst = 0.0
    for r in rows:
        pred = 1e3 * model.predict(r["method"], r["world"])
        err = (pred - r["median_ms"]) / r["median_ms"]
        if r["world"] > 2:
            worst = max(worst, abs(err))
        lines.append(f"| {r['method']} | {r['world']} | {r['median_ms']:.1f} | {pred:.1f} | {100 * err:+.0f}% |")
    return lines, worst


def extrapolation_table(model, ns=(16, 64, 256, 1024), gbits=(1, 10, 100)):
    lines = ["| method | codec | " + " | ".join(f"{g} Gbit/s, {n} ranks" for g in gbits for n in ns) + " |",
             "|---|---|" + "---|" * (len(gbits) * len(ns))]
    for m in model.methods:
        for kind in ("CPU", "GPU"):
            cells = []
            for g in gbits:
                for n in ns:
                    codec = model.codec2[m] if kind == "CPU" else gpu_codec(m)
                    cells.append(f"{1e3 * model.predict(m, n, g * 1e9 / 8 * 0.95, False, codec):.1f}")
            lines.append(f"| {m} | {kind} | " + " | ".join(cells) + " |")
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
    ax.set(xscale="log", yscale="log", xlabel="ranks", ylabel="aggregation per step (ms)",
           title="measured (dots) and modelled (lines), emulated cluster")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{tag}_vs_n.png"), dpi=120)
    region_plot(model, os.path.join(out_dir, f"{tag}_regions.png"))


def region_plot(model, path):
    import matplotlib.pyplot as plt
    import numpy as np
    gbits = np.logspace(-1, 2, 31)  # 0.1 .. 100 Gbit/s
    ns = [2 ** k for k in range(1, 11)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, kind in zip(axes, ("CPU", "GPU (assumed codec)")):
        best = np.zeros((len(gbits), len(ns)), dtype=int)
        for i, g in enumerate(gbits):
            for j, n in enumerate(ns):
                times = [model.predict(m, n, g * 1e9 / 8 * 0.95, False,
                                       model.codec2[m] if kind == "CPU" else gpu_codec(m)) for m in model.methods]
                best[i, j] = int(np.argmin(times))
        ax.imshow(best, origin="lower", aspect="auto", cmap="tab10", vmin=0, vmax=9,
                  extent=(0.5, len(ns) + 0.5, -1, 2))
        for idx in np.unique(best):
            i, j = np.argwhere(best == idx)[len(np.argwhere(best == idx)) // 2]
            ax.text(j + 1, np.log10(gbits[i]), model.methods[idx], ha="center", va="center", fontsize=8)
        ax.set_xticks(range(1, len(ns) + 1), [str(n) for n in ns])
        ax.set(xlabel="ranks", title=f"shortest aggregation, {kind}")
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
    rows, mbit = data["rows"], data["args"]["mbit"]
    model = Model(rows, mbit, args.cores)
    tag = os.path.splitext(os.path.basename(args.measurements))[0] + "_model"
    val, worst = validation_table(model, rows)
    lines = [f"# Scaling model against the emulated cluster ({mbit:g} Mbit/s per node)", "",
             f"Command: `python benchmarks/ddp/scaling_model.py {args.measurements}`  ",
             f"Fitted: bandwidth {model.bandwidth * 8 / 1e6:.1f} Mbit/s effective (link {mbit:g}), software cost per hop "
             f"{1e6 * model.latency:.0f} us, {args.cores} shared cores. Worst error beyond 2 ranks: "
             f"{100 * worst:.0f}%.", "", "Codec per method at 2 ranks (ms): "
             + ", ".join(f"{m} {1e3 * c:.1f}" for m, c in model.codec2.items()), "", *val, "",
             "## Extrapolation (ms per step of aggregation; CPU: codec as measured at 2 ranks, one core per rank; "
             "GPU: ASSUMED codec 0.1 ms + 1.86 MB at 1 TB/s; per-hop cost as fitted, no contention; 95% of the link rate)", "",
             *extrapolation_table(model), "",
             f"![measured and modelled]({tag}_vs_n.png)", "", f"![regions]({tag}_regions.png)"]
    with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plots(model, rows, args.out, tag)
    print("\n".join(lines[:12]))
    print(f"worst error beyond 2 ranks: {100 * worst:.0f}%")


if __name__ == "__main__":
    main()
