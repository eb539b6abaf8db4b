"""``python -m dmlkit.train [--field value ...]``: one flag per ``TrainConfig`` field.

Examples:
    python -m dmlkit.train --loss triplet --density --out-dir runs/triplet-da
    torchrun --nproc_per_node=2 -m dmlkit.train --dataset glyphs-mini \
        --classes-per-batch 8 --samples-per-class 4 --out-dir runs/ddp

Under torchrun, give P and K as ``--classes-per-batch``/``--samples-per-class`` (or put
``--`` before the script's flags): torchrun's own parser takes ``--p`` for an abbreviation
of its options and stops with "ambiguous option".

Dict fields take JSON (``--loss-params '{"margin": 0.1}'``), eval_ks a comma list
(``--eval-ks 1,10,100``); booleans have ``--x/--no-x``. The final metrics are printed as
JSON on stdout (rank 0); progress and per-epoch lines go to stderr. Exit status 2: the
configuration, the data, the checkpoint or the run folder was refused (one message);
1: training diverged (``NonFiniteLossError``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

import torch

from dmlkit.data import DatasetError
from dmlkit.io import LockHeldError
from dmlkit.train.config import TrainConfig, field_docs
from dmlkit.train.loop import fit
from dmlkit.train.outputs import check_out_dir
from dmlkit.train.state import NonFiniteLossError

# Long spellings that no torchrun option starts with: torchrun's argparse expands
# abbreviations in the whole command line, script flags included, so "--p" is ambiguous.
_ALIASES = {"p": ("--classes-per-batch",), "k": ("--samples-per-class",)}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one option per TrainConfig field, help = the field's docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m dmlkit.train",
        description="Train and evaluate a deep-metric-learning model (dmlkit.train.fit).",
        epilog="Under torchrun use --classes-per-batch/--samples-per-class for --p/--k (or "
        "put -- before the script's flags): torchrun reads --p as an ambiguous abbreviation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    docs, hints = field_docs(), typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        default = (
            item.default if item.default is not dataclasses.MISSING else item.default_factory()
        )
        flags = ("--" + item.name.replace("_", "-"), *_ALIASES.get(item.name, ()))
        kind = _parser_type(hints[item.name])
        if kind is bool:
            parser.add_argument(
                *flags,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=docs.get(item.name, ""),
            )
        else:
            parser.add_argument(
                *flags,
                dest=item.name,
                type=kind,
                default=default,
                help=docs.get(item.name, ""),
                metavar=item.name.upper(),
            )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's own choice)",
    )
    return parser


def _parser_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = typing.get_origin(args[0]) or args[0]
    if kind is dict:
        return _json_dict
    if kind is tuple:
        return _int_tuple
    return kind


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:  # torch.set_num_threads would raise a RuntimeError after parsing
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"margin\": 0.1}'")
    return value


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from error


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    threads = args.pop("threads")
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = TrainConfig(**args)
        check_out_dir(cfg)  # fit checks it too; here the refusal is a message, not a traceback
    except ValueError as error:
        sys.stderr.write(f"{error}\n")
        return 2
    try:
        result = fit(cfg)
    except (ValueError, DatasetError, LockHeldError) as error:  # incl. CheckpointError
        sys.stderr.write(f"{error}\n")  # a bad input: its message, not a traceback
        return 2
    except NonFiniteLossError as error:
        sys.stderr.write(f"{error}\n")
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(json.dumps(result.metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
