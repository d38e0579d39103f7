"""Data readers parse generated files exactly and reject malformed ones with a clear error."""
import gzip
import struct

import pytest
import torch

from gradiveq.datasets import load_fashion_mnist, read_cifar100_bin, read_idx


def write_cifar(path, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 20, (n, 1), generator=g, dtype=torch.uint8)
    fine = torch.randint(0, 100, (n, 1), generator=g, dtype=torch.uint8)
    pixels = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8)
    path.write_bytes(torch.cat([coarse, fine, pixels], 1).numpy().tobytes())
    return pixels.view(n, 3, 32, 32), fine.view(-1).long(), coarse.view(-1).long()


def test_cifar100_reader_parses_generated_records_exactly(tmp_path):
    f = tmp_path / "train.bin"
    pixels, fine, coarse = write_cifar(f, 7)
    images, labels, coarse_labels = read_cifar100_bin(str(f))
    assert torch.equal(images, pixels) and torch.equal(labels, fine) and torch.equal(coarse_labels, coarse)


def test_cifar100_reader_rejects_truncated_and_malformed_files(tmp_path):
    f = tmp_path / "train.bin"
    write_cifar(f, 3)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match="not a positive multiple of the 3074-byte record"):
        read_cifar100_bin(str(f))
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="0 bytes"):
        read_cifar100_bin(str(f))
    bad = bytearray(3074)
    bad[1] = 150  # fine label out of range
    f.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="labels out of range"):
        read_cifar100_bin(str(f))
    with pytest.raises(FileNotFoundError, match="path"):
        read_cifar100_bin(str(tmp_path / "missing.bin"))


def idx_bytes(array: torch.Tensor) -> bytes:
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(">" + "I" * array.dim(), *array.shape)
    return header + array.numpy().tobytes()


def test_idx_reader_parses_plain_and_gzipped_files(tmp_path):
    data = torch.randint(0, 256, (5, 4, 3), dtype=torch.uint8)
    plain, zipped = tmp_path / "a-idx3-ubyte", tmp_path / "a-idx3-ubyte.gz"
    plain.write_bytes(idx_bytes(data))
    zipped.write_bytes(gzip.compress(idx_bytes(data)))
    assert torch.equal(read_idx(str(plain)), data) and torch.equal(read_idx(str(zipped)), data)


def test_idx_reader_rejects_malformed_files(tmp_path):
    data = torch.randint(0, 256, (5, 4), dtype=torch.uint8)
    f = tmp_path / "x-idx2-ubyte"
    f.write_bytes(idx_bytes(data)[:-3])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_idx(str(f))
    f.write_bytes(b"\x01\x02\x08\x02" + idx_bytes(data)[4:])
    with pytest.raises(ValueError, match="bad idx magic"):
        read_idx(str(f))
    f.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="shorter than the idx header"):
        read_idx(str(f))
    g = tmp_path / "y-idx2-ubyte.gz"
    g.write_bytes(gzip.compress(idx_bytes(data))[:-8])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        read_idx(str(g))


def test_fashion_mnist_from_debian_package_loads():
    (train_x, train_y), (test_x, test_y) = load_fashion_mnist()
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert int(train_y.max()) == 9 and 0.0 <= float(train_x.min()) and float(train_x.max()) <= 1.0


def test_fashion_mnist_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path))
