"""``python -m sandbox_kernels.pool``: the agent started on demand (see :mod:`.client`)."""

import argparse
import logging
import sys

from .cli import add_parser


def main() -> int:
    """Parse ``serve|status|stop`` as ``sandbox-kernels pool`` does."""
    parser = argparse.ArgumentParser(prog="python -m sandbox_kernels.pool")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pool", *sys.argv[1:]])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
