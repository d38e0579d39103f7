"""Readers for the real data sets the benchmarks use, with clear errors for malformed files.

* CIFAR-100 binary format (``train.bin`` / ``test.bin``): records of 1 coarse label byte, 1 fine label byte and
  3072 pixel bytes (3 x 32 x 32, channel-major). Not available on these machines: the benchmark falls back to
  synthetic data and says so.
* Fashion-MNIST / MNIST idx files, plain or gzipped (Debian's ``dataset-fashion-mnist`` installs them under
  ``/usr/share/datasets/fashion-mnist/``).
"""

import gzip
import os
import struct
import zlib

import torch

__all__ = ["read_cifar100_bin", "read_idx", "load_fashion_mnist", "FASHION_MNIST_DIR",
           "CIFAR100_MEAN", "CIFAR100_STD"]

CIFAR100_RECORD = 1 + 1 + 3072
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def read_cifar100_bin(path: str):
    """Returns (images uint8 [N, 3, 32, 32], fine labels int64 [N], coarse labels int64 [N])."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_cifar100_bin: argument 'path': no such file {path!r} (expected the CIFAR-100 "
                                f"binary version's train.bin / test.bin)")
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) == 0 or len(raw) % CIFAR100_RECORD != 0:
        raise ValueError(f"read_cifar100_bin: file {path!r} has {len(raw)} bytes, not a positive multiple of the "
                         f"{CIFAR100_RECORD}-byte record (1 coarse + 1 fine label + 3072 pixels): truncated or not "
                         f"CIFAR-100")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, CIFAR100_RECORD)
    coarse, fine = data[:, 0].long(), data[:, 1].long()
    if int(fine.max()) > 99 or int(coarse.max()) > 19:
        raise ValueError(f"read_cifar100_bin: file {path!r} holds labels out of range (fine max {int(fine.max())}, "
                         f"coarse max {int(coarse.max())}): not CIFAR-100")
    return data[:, 2:].reshape(-1, 3, 32, 32).clone(), fine, coarse


def read_idx(path: str) -> torch.Tensor:
    """Reads an idx file (optionally gzipped) into a uint8 tensor of the shape its header gives."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_idx: argument 'path': no such file {path!r}")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream inside the gzip file
        raise ValueError(f"read_idx: file {path!r} cannot be read ({e}): corrupted or truncated") from e
    if len(raw) < 4:
        raise ValueError(f"read_idx: file {path!r} has {len(raw)} bytes, shorter than the idx header")
    zero, dtype_code, ndim = raw[0] | raw[1] << 8, raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise ValueError(f"read_idx: file {path!r} has a bad idx magic ({raw[:4].hex()}); expected unsigned-byte "
                         f"data (0x0000 08 0N)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"read_idx: file {path!r} is truncated inside its header")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = 1
    for s in shape:
        count *= s
    if len(raw) - header != count:
        raise ValueError(f"read_idx: file {path!r} holds {len(raw) - header} data bytes but its header "
                         f"{tuple(shape)} needs {count}: truncated or corrupted")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(*shape).clone()


def load_fashion_mnist(root: str = FASHION_MNIST_DIR):
    """Returns ((train images [60000, 1, 28, 28] float in [0, 1], labels), (test images, labels))."""
    def pick(stem):
        for name in (stem + ".gz", stem):
            path = os.path.join(root, name)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(f"load_fashion_mnist: argument 'root': {root!r} lacks {stem}(.gz) (install Debian's "
                                f"dataset-fashion-mnist, which `make setup` does)")
    out = []
    for split in ("train", "t10k"):
        images = read_idx(pick(f"{split}-images-idx3-ubyte")).float().div_(255.0).unsqueeze(1)
        labels = read_idx(pick(f"{split}-labels-idx1-ubyte")).long()
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"load_fashion_mnist: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
        out.append((images, labels))
    return out[0], out[1]
