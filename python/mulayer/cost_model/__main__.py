"""``python -m mulayer.cost_model train PROFILE.jsonl... -o MODEL.zip``: train and save.

python -m mulayer.cost_model train data/profile-h100.jsonl -o cost-model-h100.zip
python -m mulayer.cost_model show h100   # a file, or the name of a shipped model

The shipped models are python/mulayer/cost_model/shipped/cost-model-<name>.zip (package data).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mulayer.errors import MuLayerError


def _train(args: argparse.Namespace) -> int:
    from mulayer.fileio import check_output_path
    from mulayer.profiler import read_many

    from . import CostModelConfig, profile_data, save_cost_model, train_cost_model

    output = Path(args.output)
    check_output_path(output)
    data = profile_data(read_many(args.profiles), args.profile_id, args.statistic)
    config = CostModelConfig(predictor=args.predictor, transfer_memory=args.transfer_memory)
    model = train_cost_model(data, config)
    save_cost_model(model, output)
    parts = ", ".join(f"{n} {p}" for p, n in sorted(model.training["parts"].items()))
    print(f"{output}: {args.predictor} on {parts} parts of {model.training['layers']} layers")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .archive import read_manifest
    from .defaults import resolve_path

    manifest = read_manifest(resolve_path(args.model))
    manifest["feature_schema"] = {
        k: v for k, v in manifest["feature_schema"].items() if k != "names"
    }
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .data import STATISTICS
    from .model import CostModelConfig
    from .predictors import PREDICTORS
    from .transfer import MEMORY_CHOICES

    parser = argparse.ArgumentParser(prog="python -m mulayer.cost_model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a cost model on profile data and save it")
    train.add_argument("profiles", nargs="+", help="profile data (JSONL) of mulayer profile")
    train.add_argument("-o", "--output", required=True, help="cost model archive (.zip)")
    train.add_argument("--profile-id", help="the profile to use when the data holds several")
    train.add_argument(
        "--predictor", choices=tuple(PREDICTORS), default=CostModelConfig().predictor
    )
    train.add_argument(
        "--transfer-memory", choices=MEMORY_CHOICES, default=CostModelConfig().transfer_memory
    )
    train.add_argument(
        "--statistic",
        choices=STATISTICS,
        default="median",
        help="latency of a part from its repeats: median (default) or min (busy machines)",
    )
    train.set_defaults(handler=_train)
    show = sub.add_parser("show", help="print a cost model's manifest")
    show.add_argument("model", help="cost model archive (.zip) or a shipped model's name (h100)")
    show.set_defaults(handler=_show)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except MuLayerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
