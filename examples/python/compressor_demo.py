"""GradiVeQ's compressor on real ResNet-32 gradients (synthetic CIFAR-100-shaped data).

Trains ResNet-32 for a warm-up, collects a sampling window of conv weight gradients, fits one PCA compressor
per conv layer on the first slice of each gradient (the paper's s = infinity), and reports per layer: slice
length K, kept components d, compression ratio K/d, explained variance of the window, and the relative
reconstruction error ||g_hat - g|| / ||g|| on held-out iterations that follow the window (all slices).

    PYTHONPATH=python python examples/python/compressor_demo.py [--warmup 60 --window 40 --holdout 20]
"""

import argparse
import os
import sys
import time

# ResNet-32 and the synthetic data come from the DDP benchmarks (benchmarks/ddp/models.py, data.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks", "ddp"))

import torch  # noqa: E402

import gradiveq  # noqa: E402
from data import SyntheticCifar100  # noqa: E402
from models import conv_weight_names, resnet32  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=60, help="uncompressed iterations before sampling")
    ap.add_argument("--window", type=int, default=40, help="sampling iterations (PCA samples per layer)")
    ap.add_argument("--holdout", type=int, default=20, help="held-out iterations to measure the error on")
    ap.add_argument("--energy", type=float, default=0.99, help="PCA energy threshold (paper: 0.99)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    model = resnet32()
    data = SyntheticCifar100(args.batch, seed=args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    params = dict(model.named_parameters())
    names = conv_weight_names(model)
    layouts = {n: gradiveq.ConvSliceLayout.for_weight(list(params[n].shape)) for n in names}
    print(f"GradiVeQ {gradiveq.__version__} compressor demo: ResNet-32, SYNTHETIC CIFAR-100-shaped data "
          f"(no real data), batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    def step():
        images, labels = data.batch()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        grads = {n: layouts[n].to_paper_order(params[n].grad.detach()) for n in names}
        opt.step()
        return loss.item(), grads

    t0 = time.time()
    total = args.warmup + args.window + args.holdout
    window = {n: [] for n in names}
    held_out = {n: [] for n in names}
    for it in range(total):
        loss, grads = step()
        for n in names:
            if args.warmup <= it < args.warmup + args.window:
                window[n].append(layouts[n].slices(grads[n])[0].clone())  # the layer's first slice
            elif it >= args.warmup + args.window:
                held_out[n].append(grads[n])
        if it % 20 == 0 or it == total - 1:
            print(f"  iter {it:4d}  loss {loss:.3f}  ({time.time() - t0:.0f} s)", flush=True)

    print(f"\nper conv layer: fitted on {args.window} first-slice samples after {args.warmup} iterations, "
          f"energy {args.energy}; error on {args.holdout} held-out iterations (all slices)")
    header = f"{'layer':<26}{'shape':<16}{'K':>6}{'d':>5}{'K/d':>7}{'expl.var':>9}{'rel.err':>9}"
    print(header)
    print("-" * len(header))
    bytes_in = bytes_out = 0
    errors = []
    for n in names:
        layout = layouts[n]
        pca = gradiveq.PcaCompressor.fit(torch.stack(window[n]), energy=args.energy)
        num, den = 0.0, 0.0
        for g in held_out[n]:
            s = layout.slices(g)
            num += (pca.decompress(pca.compress(s)) - s).pow(2).sum().item()
            den += s.pow(2).sum().item()
        err = (num / den) ** 0.5
        errors.append(err)
        bytes_in += 4 * layout.numel
        bytes_out += 4 * (layout.num_slices * pca.num_components + layout.tail_len)
        shape = "x".join(str(v) for v in params[n].shape)
        print(f"{n:<26}{shape:<16}{layout.slice_len:>6}{pca.num_components:>5}{pca.compression_ratio:>7.1f}"
              f"{pca.explained_variance:>9.3f}{err:>9.3f}")
    errors.sort()
    print(f"\nconv gradients: {bytes_in / 1e6:.3f} MB -> {bytes_out / 1e6:.3f} MB per step "
          f"(ratio {bytes_in / bytes_out:.1f}); held-out relative error median {errors[len(errors) // 2]:.3f}, "
          f"range {errors[0]:.3f}-{errors[-1]:.3f}")


if __name__ == "__main__":
    main()
