"""`python -m sweeper.export MODEL_URI -o model.pt`: a merged, exported model for MD.

Folds the adapter into the base weights (W + (alpha/rank) B A) and writes metatomic's
TorchScript format, which `metatomic_ase.MetatomicCalculator("model.pt")`, LAMMPS and
i-PI load without this package. MODEL_URI: `models:/<name>@champion`, `models:/<name>/3`,
`runs:/<run id>/adapter` or a local adapter folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow

from sweeper import config, tracking
from sweeper.config import ConfigError
from sweeper.registry import models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeper.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("uri", help="e.g. models:/base_pet_cu-lora@champion")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the file to write, e.g. model.pt")
    parser.add_argument("--base-checkpoint", help="the base model file, when it moved since training")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else tracking.uri of conf/")
    args = parser.parse_args(argv)
    try:
        if not Path(args.uri).is_dir():
            mlflow.set_tracking_uri(tracking.resolve_uri(args.tracking_uri, config.composed().tracking.uri))
        path = models.export(args.uri, args.output, args.base_checkpoint)
    except (models.ModelError, ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {args.uri} merged into its base model")
    print(f'use it: MetatomicCalculator("{path}") from metatomic_ase, or in LAMMPS / i-PI')
    return 0


if __name__ == "__main__":
    sys.exit(main())
