"""The sampling noise of FD-FMNIST at a sample size: FD of random subsets of real training images against the test
set (what a perfect sampler would score, and how much it varies from draw to draw).

    python benchmarks/fd_sampling_noise.py --classifier ../shared/fixtures/fmnist-classifier \
        --data /usr/share/datasets/fashion-mnist --n 2000 5000
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "t2i"))
from t2i_common import fmnist_labelled  # noqa: E402

from diffusers_fewstep.evaluation import (extract_features, feature_statistics, frechet_distance,  # noqa: E402
                                          load_fmnist_classifier, reference_statistics)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classifier", required=True, help="fmnist-classifier fixture folder")
    p.add_argument("--data", required=True, help="Fashion-MNIST IDX folder (train and test)")
    p.add_argument("--n", type=int, nargs="+", default=[2000, 5000], help="sample sizes")
    p.add_argument("--subsets", type=int, default=20, help="random subsets per size")
    p.add_argument("--pool", type=int, default=40000, help="training images drawn from")
    args = p.parse_args(argv)
    net = load_fmnist_classifier(args.classifier)
    test_stats = reference_statistics(net, args.data)
    feats = extract_features(net, fmnist_labelled(args.data, "train", args.pool)[0])
    rng = np.random.default_rng(0)
    for n in args.n:
        fds = [frechet_distance(feature_statistics(feats[rng.choice(len(feats), n, replace=False)]), test_stats)
               for _ in range(args.subsets)]
        print(f"n={n}: FD of {args.subsets} real training subsets against the test set: mean {np.mean(fds):.3f}, "
              f"std {np.std(fds):.3f}, min {min(fds):.3f}, max {max(fds):.3f}")


if __name__ == "__main__":
    main()
