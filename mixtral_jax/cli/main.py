"""`mixtral-jax` command line: each subcommand lives with the code it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from mixtral_jax.sharding.distributed import initialize

# module -> it defines `register(subparsers)`, which adds its subcommands with `set_defaults(run=fn)`
_COMMAND_MODULES = ("mixtral_jax.cli.generate", "mixtral_jax.cli.convert", "mixtral_jax.cli.train",
                    "mixtral_jax.cli.plan", "mixtral_jax.cli.info", "mixtral_jax.cli.serve", "mixtral_jax.cli.export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixtral-jax", allow_abbrev=False,
        description="Mixtral in JAX: convert, verify, info, export, generate, chat, serve, train, plan.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        initialize()  # joins the other processes when launch/ (or a TPU pod / SLURM) started several
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # our errors are one line each
        print(f"mixtral-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixtral-jax {args.command}: interrupted", file=sys.stderr)
        return 130

