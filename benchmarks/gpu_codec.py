"""GB/s of GradiVeQ's compress + decompress on the GPU: the CUDA kernels (one grouped launch) against the cuBLAS
path (torch.matmul / addmm, what CUDA tensors get with the kernels off) on every ResNet-32 and ResNet-50 conv
shape and on a 25 MB bucket, and against the device-to-device copy bandwidth. Every byte moved counts: the
gradient read, the basis read twice (once per product), the coefficients written and read, the mean, the
reconstruction written.

    python benchmarks/gpu_codec.py --out benchmarks/results/gpu_codec.md

Slices are the library's default kernel-position slices (S = kernel positions, K = C_in C_out) with
d = min(K / 4, 50 S): the rank of a 50-step sampling window, the most a fit can give. Without a GPU it says so
and exits 0 (scripts/gpu_check.sh --dry-run).
"""
import argparse
import statistics
import sys

import torch

import gradiveq


def resnet32_convs():
    """(name, S, K) of ResNet-32's 3x3 convs (CIFAR layout: 16, 32, 64 channels, 5 blocks each)."""
    shapes, c_in = [("conv1", 9, 3 * 16)], 16
    for stage, width in enumerate((16, 32, 64)):
        for block in range(5):
            shapes.append((f"stage{stage}.block{block}.conv1", 9, c_in * width))
            shapes.append((f"stage{stage}.block{block}.conv2", 9, width * width))
            c_in = width
    return shapes


def resnet50_convs():
    """(name, S, K) of ResNet-50's distinct convs (bottleneck blocks 3-4-6-3)."""
    shapes, c_in = [("conv1 7x7", 49, 3 * 64)], 64
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for block in range(blocks):
            shapes.append((f"layer{stage + 1}.{block}.conv1 1x1", 1, c_in * width))
            shapes.append((f"layer{stage + 1}.{block}.conv2 3x3", 9, width * width))
            shapes.append((f"layer{stage + 1}.{block}.conv3 1x1", 1, width * 4 * width))
            c_in = width * 4
    return shapes


def components(s, k):
    return max(1, min(k // 4, 50 * s))


def make_layer(s, k, dtype):
    d = components(s, k)
    basis = torch.linalg.qr(torch.randn(k, d, device="cuda"))[0].to(dtype).contiguous()
    return dict(g=torch.randn(s, k, device="cuda"), basis=basis, basis_f=basis.float(), mean=torch.randn(k, device="cuda"),
                offset=torch.randn(d, device="cuda"), c=torch.empty(s, d, device="cuda"),
                out=torch.empty(s, k, device="cuda"))


def bytes_moved(layers):
    total = 0
    for l in layers:
        s, k = l["g"].shape
        d = l["basis"].shape[1]
        basis = l["basis"].numel() * l["basis"].element_size()
        total += 4 * s * k + basis + 4 * s * d + 4 * d  # compress: g, U, c written, offset
        total += 4 * s * d + basis + 4 * k + 4 * s * k  # decompress: c, U, mean, reconstruction written
    return total


def kernels_round_trip(layers):
    gradiveq._C._cuda_project_grouped([(l["g"], l["basis"], l["offset"], l["c"], 1.0) for l in layers], False)
    gradiveq._C._cuda_project_grouped([(l["c"], l["basis"], l["mean"], l["out"], 0.5) for l in layers], True)


def cublas_round_trip(layers):
    for l in layers:
        torch.addmm(l["offset"], l["g"], l["basis_f"], out=l["c"])
        torch.addmm(l["mean"], l["c"], l["basis_f"].t(), out=l["out"])


def seconds(fn, repeats):
    """Median and spread of `repeats` timed runs (CUDA events) after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), min(times), max(times)


def copy_bandwidth(repeats):
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t, _, _ = seconds(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() / t / 1e9  # read + write


def bucket_of_25mb(shapes, dtype):
    """ResNet-50's convs in backward order until their gradients fill 25 MB (DDP's default bucket)."""
    layers, size = [], 0
    for name, s, k in reversed(shapes):
        if size + 4 * s * k > 25 * 2**20 and layers:
            break
        layers.append(make_layer(s, k, dtype))
        size += 4 * s * k
    return layers, size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="markdown table (default: print only)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--basis-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_codec: no CUDA device, nothing measured")
        return 0
    if not hasattr(gradiveq._C, "_cuda_project_grouped"):
        print("gpu_codec: this gradiveq build has no CUDA kernels (GRADIVEQ_ENABLE_CUDA off)", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.basis_dtype)
    copy = copy_bandwidth(args.repeats)
    rows = []
    seen = set()
    for model, shapes in (("ResNet-32", resnet32_convs()), ("ResNet-50", resnet50_convs())):
        for name, s, k in shapes:
            if (s, k) in seen:
                continue
            seen.add((s, k))
            layers = [make_layer(s, k, dtype)]
            rows.append((model, name, s, k, components(s, k), layers))
    bucket, bucket_bytes = bucket_of_25mb(resnet50_convs(), dtype)
    rows.append(("ResNet-50", f"25 MB bucket ({len(bucket)} layers, {bucket_bytes / 2**20:.1f} MB)", "-", "-", "-",
                 bucket))
    lines = [f"# GradiVeQ codec on {torch.cuda.get_device_name()}: compress + decompress",
             "",
             f"Command: `python benchmarks/gpu_codec.py --repeats {args.repeats} --basis-dtype {args.basis_dtype}`  ",
             f"Device-to-device copy: {copy:.0f} GB/s (read + write). GB/s = bytes moved (gradient, basis twice, "
             "coefficients, mean, reconstruction) / median time of compress + decompress; cuBLAS = torch.addmm on "
             "the same tensors (the kernels-off path, float32 basis).",
             "",
             "| model | layer | S | K | d | kernels GB/s | cuBLAS GB/s | kernels / cuBLAS | kernels / copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    misses = []
    for model, name, s, k, d, layers in rows:
        moved = bytes_moved(layers)
        tk, _, _ = seconds(lambda: kernels_round_trip(layers), args.repeats)
        tc, _, _ = seconds(lambda: cublas_round_trip(layers), args.repeats)
        gk, gc = moved / tk / 1e9, moved / tc / 1e9
        lines.append(f"| {model} | {name} | {s} | {k} | {d} | {gk:.0f} | {gc:.0f} | {gk / gc:.2f} | {gk / copy:.2f} |")
        if gk < gc:
            misses.append(f"{model} {name}: {gk / gc:.2f}x cuBLAS")
        del layers[:]
        torch.cuda.empty_cache()
    bucket_line = lines[-1]
    if float(bucket_line.split("|")[-2]) < 0.8:
        misses.append("25 MB bucket below 80% of copy bandwidth")
    lines += ["", "Targets (issue 19): at least cuBLAS on every shape, 80% of copy bandwidth on the bucket: "
              + ("met." if not misses else "missed on " + "; ".join(misses) + ".")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
