"""Run the side-by-side benchmark without installing the package (same options as `diffusers-fewstep benchmark`).

    PYTHONPATH=src python benchmarks/run_benchmark.py --help
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from diffusers_fewstep import benchmark  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="run_benchmark.py", description=benchmark.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(parser)
    sys.exit(benchmark.run(parser.parse_args()))
