"""Data readers parse generated files exactly and reject malformed ones with a clear error."""
import gzip
import struct

import pytest
import torch

from datasets import load_fashion_mnist, read_cifar100_bin, read_idx


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


def mutate(data: bytes, rng: "random.Random") -> bytes:
    """One seeded random damage: bit flips, an overwritten 4-byte field, truncation or inserted junk."""
    b = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        at = rng.randrange(max(len(b) - 4, 1))
        b[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00",
                                   bytes(rng.randrange(256) for _ in range(4))])
    elif kind == 2:
        del b[rng.randrange(len(b)):]
    else:
        at = rng.randrange(len(b))
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


def test_readers_survive_randomly_damaged_files(tmp_path):
    """Seeded mutation fuzzing: every damaged file either parses (a changed pixel is still an image) or raises
    ValueError; no other exception, no crash, no giant allocation from a corrupted header."""
    import random
    rng = random.Random(7)
    cifar = tmp_path / "train.bin"
    write_cifar(cifar, 4)
    cifar_good = cifar.read_bytes()
    data = torch.randint(0, 256, (6, 5, 4), dtype=torch.uint8)
    idx_good = idx_bytes(data)
    outcomes = {"parsed": 0, "ValueError": 0}
    for trial in range(600):
        target = trial % 3
        if target == 0:
            f, good, read = cifar, cifar_good, read_cifar100_bin
        else:
            f = tmp_path / ("a-idx3-ubyte" if target == 1 else "a-idx3-ubyte.gz")
            good = idx_good if target == 1 else gzip.compress(idx_good)
            read = read_idx
        f.write_bytes(mutate(good, rng))
        try:
            read(str(f))
            outcomes["parsed"] += 1
        except ValueError:
            outcomes["ValueError"] += 1
    assert outcomes["ValueError"] > 100, outcomes
