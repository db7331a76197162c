"""`diffusers-fewstep` console script: `optimize` (Phase 1), `benchmark`, `train` (Phase 1 ⇄ Phase 2).

Bad input ends in one line `diffusers-fewstep: error: …` on stderr and exit status 2 (as argparse's own errors);
`--verbose` (before or after the subcommand) adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from .checks import UsageError, check_args, option_names

PROG = "diffusers-fewstep"
# subcommand -> module with `add_arguments(parser)` and `run(args)`
COMMANDS = {
    "optimize": ("diffusers_fewstep.optimize_cli", "learn σ tables for a model (Phase 1)"),
    "benchmark": ("diffusers_fewstep.benchmark", "side-by-side benchmark of samplers and learned tables"),
    "train": ("diffusers_fewstep.train",
              "alternate Phase 1 and Phase 2 (`accelerate launch scripts/train_fewstep.py` for several GPUs)"),
}
VERBOSE_HELP = "on an error, show the full traceback"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(p)
        # SUPPRESS: an absent subcommand --verbose leaves the top-level value alone
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        p.set_defaults(_module=module, _options=option_names(p))
    return parser


def fail(err: Exception, verbose: bool, hint: str = "") -> int:
    """Print `err` as one `diffusers-fewstep: error:` line (after its traceback with `verbose`); return 2."""
    if verbose:
        traceback.print_exception(type(err), err, err.__traceback__)
    message = " ".join(str(err).split())  # one line, whatever the exception's text
    print(f"{PROG}: error: {message}{hint}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args, args._options)
        return importlib.import_module(args._module).run(args)
    except UsageError as err:
        return fail(err, args.verbose)
    except (ValueError, OSError) as err:  # input trouble the checks cannot see (a corrupt file, the network)
        return fail(err, args.verbose, " (--verbose shows the traceback)")


if __name__ == "__main__":
    sys.exit(main())
