"""Export a training run as a shareable model folder (issue 12).

Writes to ``--out``: model.safetensors (EMA weights by default), config.json (the run's saved model and
diffusion config), calibration.json (from RUN_DIR or ``--calibration``, when present) and a README.md
model card (with the metrics of ``--metrics METRICS_JSON`` when given). Load it with
``guided_diffusion.export.load_pretrained(DIR)``.

Example:
    python scripts/export_model.py LOGS/run1 --out exports/run1 --metrics EVAL/metrics.json
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.cli import run_cli  # noqa: E402
from guided_diffusion.export import export_run  # noqa: E402


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="training log dir (model*/ema_*/state*.pt, config.json)")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--rate", default="0.9999", help="EMA rate with --weights ema (default 0.9999)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--calibration", default=None, help="calibration.json (default: RUN_DIR/calibration.json)")
    p.add_argument("--metrics", default=None, help="metrics.json of an evaluation, shown in the model card")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    return p


def main(argv: list[str]) -> int:
    args = create_argparser().parse_args(argv)
    cfg = export_run(args.run_dir, args.out, weights=args.weights, rate=args.rate, step=args.step,
                     calibration=args.calibration, metrics=args.metrics, overwrite=args.overwrite)
    w = cfg["weights"]
    print(f"exported {w['kind']} weights of step {w['step']} ({w['n_parameters']:,} parameters) "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
