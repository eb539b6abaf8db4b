"""``python -m dmlkit.train [--field value ...]``: one flag per ``TrainConfig`` field.

Examples:
    python -m dmlkit.train --loss triplet --density --out-dir runs/triplet-da
    torchrun --nproc_per_node=2 -m dmlkit.train --dataset glyphs-mini --out-dir runs/ddp

Dict fields take JSON (``--loss-params '{"margin": 0.1}'``), eval_ks a comma list
(``--eval-ks 1,10,100``); booleans have ``--x/--no-x``. The final metrics are printed as
JSON on stdout (rank 0); progress and per-epoch lines go to stderr.
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

from dmlkit.train.config import TrainConfig, field_docs
from dmlkit.train.loop import fit


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one option per TrainConfig field, help = the field's docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m dmlkit.train",
        description="Train and evaluate a deep-metric-learning model (dmlkit.train.fit).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    docs, hints = field_docs(), typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        default = (
            item.default if item.default is not dataclasses.MISSING else item.default_factory()
        )
        flag = "--" + item.name.replace("_", "-")
        kind = _parser_type(hints[item.name])
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=docs.get(item.name, ""),
            )
        else:
            parser.add_argument(
                flag,
                type=kind,
                default=default,
                help=docs.get(item.name, ""),
                metavar=item.name.upper(),
            )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)"
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
    except ValueError as error:
        sys.stderr.write(f"{error}\n")
        return 2
    result = fit(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(json.dumps(result.metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
