"""The `m6` command: one subcommand per stage, each registered by its area's ``cli`` module."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from m6.config import ConfigError
from m6.errors import UserError
from m6.storage import StorageError

# Each module defines ``register(subparsers)``; its handlers set ``func`` and import heavy code lazily.
COMMAND_MODULES = ("m6.data.cli", "m6.train.cli", "m6.eval.cli", "m6.energy.cli")


def emit(args: argparse.Namespace, summary: dict[str, Any], human: str) -> None:
    """Print one JSON object with ``--json``, else the short human summary."""
    if getattr(args, "json", False):
        print(json.dumps(summary, ensure_ascii=False, default=str))
    else:
        print(human)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m6", description="Pretrain, evaluate and serve M6-style multimodal MoE models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that area is not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, StorageError, FileNotFoundError) as e:
        print(f"m6: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m6: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
