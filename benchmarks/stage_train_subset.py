"""Stage the first N Fashion-MNIST training images for a GPU call (the carry is limited to 64 MiB):

    python benchmarks/stage_train_subset.py 16000 .stage/train16k   # 6 MB; TRAIN_SUBSET=.stage/train16k

writes `train-images-idx3-ubyte.xz` (IDX, xz) and `train-labels-idx1-ubyte.gz` (IDX, gzip), the files
`benchmarks/phase1_gpu.sh` unpacks for its training stages.
"""
import argparse
import gzip
import lzma
import os

SOURCE = "/usr/share/datasets/fashion-mnist"  # the Debian package dataset-fashion-mnist


def subset(path: str, n: int, item_bytes: int, header_bytes: int) -> bytes:
    """The IDX file at `path` cut to its first `n` items (the count sits in bytes 4–8 of the header)."""
    with gzip.open(path) as f:
        raw = f.read()
    total = int.from_bytes(raw[4:8], "big")
    if not 0 < n <= total:
        raise SystemExit(f"{path} holds {total} items; asked for {n}")
    return raw[:4] + n.to_bytes(4, "big") + raw[8:header_bytes] + raw[header_bytes: header_bytes + n * item_bytes]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("n", type=int, help="images to keep (the first N)")
    p.add_argument("out", help="folder to write")
    p.add_argument("--source", default=SOURCE, help="folder with the Fashion-MNIST IDX .gz files")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    images = subset(os.path.join(args.source, "train-images-idx3-ubyte.gz"), args.n, 28 * 28, 16)
    with open(os.path.join(args.out, "train-images-idx3-ubyte.xz"), "wb") as f:
        f.write(lzma.compress(images, preset=9 | lzma.PRESET_EXTREME))
    labels = subset(os.path.join(args.source, "train-labels-idx1-ubyte.gz"), args.n, 1, 8)
    with gzip.open(os.path.join(args.out, "train-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(labels)
    print(f"wrote {args.n} images to {args.out}")


if __name__ == "__main__":
    main()
