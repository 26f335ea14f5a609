#!/usr/bin/env python
"""Build a synthetic BraTS-like dataset (MNI152-based, offline, deterministic per seed) in the
preprocessed layout of docs/method.md, 'Preprocessing'.

Example: python scripts/make_synthetic_brats.py --out data/synth64 --subjects 20 --seed 0 --image_size 64
Split: the preprocessing rule (random.seed(10), 75/5/20) with at least one subject in val and test.
Prints (and writes to OUT/dataset_summary.json) the per-split counts and the FLAIR-threshold baseline
(guided_diffusion/data/flair_baseline.py: best-threshold mean Dice on unhealthy slices, Dice at 0.75,
pixel AUROC / AUPRC), the score a method must beat on this data.
"""

import argparse
import json
import sys
import time

from guided_diffusion.cli import ArgumentParser, run_cli
from guided_diffusion.data.synthetic import STYLES, build_synthetic_dataset


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output root (gets data_splits/ and npy_{train,val,test}/)")
    p.add_argument("--subjects", type=int, default=20, help="number of subjects (>= 3)")
    p.add_argument("--seed", type=int, default=0, help="content seed (same seed -> identical files)")
    p.add_argument("--image_size", type=int, default=64, help="slice size in pixels, e.g. 64 or 128")
    p.add_argument(
        "--raw_nifti",
        default=None,
        help="also write BraTS-style NIfTI subjects here ({id}/{id}_flair.nii.gz, _t1, _t1ce, _t2, _seg)",
    )
    p.add_argument(
        "--healthy_fraction",
        type=float,
        default=0.2,
        help="share of tumour-free subjects per split (each split keeps >= 1 unhealthy subject)",
    )
    p.add_argument("--slice_step", type=int, default=1,
                   help="keep every N-th axial slice (2: 4 mm spacing, half the slices, for quick CPU runs)")
    p.add_argument("--style", default="brats_like", choices=STYLES,
                   help="brats_like: healthy hyperintensities and overlapping, multi-focal lesions (FLAIR "
                        "thresholding is imperfect, as on BraTS); classic: the original easy contrasts")
    p.add_argument("--no_baseline", action="store_true",
                   help="skip the FLAIR-threshold baseline in the summary (dataset_summary.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    stats = build_synthetic_dataset(
        args.out,
        subjects=args.subjects,
        seed=args.seed,
        image_size=args.image_size,
        raw_nifti=args.raw_nifti,
        healthy_fraction=args.healthy_fraction,
        overwrite=args.overwrite,
        progress=not args.quiet,
        slice_step=args.slice_step,
        style=args.style,
        baseline=not args.no_baseline,
    )
    stats["total_seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    sys.exit(run_cli(main))
