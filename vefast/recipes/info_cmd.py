"""``vefast info``."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args: argparse.Namespace) -> int:
    from .._info import info

    report = info(verbose=not args.json)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    return 0
