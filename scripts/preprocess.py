#!/usr/bin/env python
"""Preprocess BraTS21 / ATLAS NIfTI subjects into 2-D slices (docs/method.md, 'Preprocessing').

Writes OUT/data_splits/{train,val,test}/scans.csv and OUT/npy_{split}/patient_{id}/slice_{k}.npz
(x [1, C, S, S] float32 -- upstream float64 --, y [1, 1, S, S] float32) plus meta.json per patient.
Only sub-directories of --source are subjects. Channel order for --mod all: FLAIR, T1, T1ce, T2.
OUT/preprocess_record.json records the source subjects and options: a rerun with other ones refuses in one
line unless --overwrite (rebuilt in a temporary folder, swapped in by renames). Every scan is checked as it
is read (finite voxels, one grid per subject, BraTS labels in {0, 1, 2, 4}, no all-zero modality).
The 99th-percentile intensity normalisation is kept for fidelity; the loader's per-slice min-max
rescale cancels it.
"""

import argparse
import sys
from pathlib import Path

from guided_diffusion.cli import ArgumentParser, run_cli
from guided_diffusion.data.preprocess import (
    MASK_RESIZE_CHOICES,
    MOD_CHOICES,
    NAME_CHOICES,
    preprocess,
)


def main(argv=None) -> Path:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-s", "--source", required=True, help="folder with one sub-folder per subject")
    p.add_argument("--name", default="brats", choices=NAME_CHOICES, help="dataset (atlas needs -m t1)")
    p.add_argument("-m", "--mod", default="all", choices=MOD_CHOICES, help="modalities ('all' = 4 channels)")
    p.add_argument("--first", type=int, default=0, help="drop the first n axial slices (when > 0)")
    p.add_argument("--last", type=int, default=0, help="drop the last m axial slices (when > 0)")
    p.add_argument("--shape", type=int, default=128, help="output slice size (square)")
    p.add_argument(
        "--out",
        default=None,
        help="output root (default: SOURCE/../preprocessed_data_{mod}_{first}{last}_{shape})",
    )
    p.add_argument(
        "--mask_resize",
        default="area",
        choices=MASK_RESIZE_CHOICES,
        help="area (default): mask resized by area weighting, saved as the soft coverage fraction; "
        "bilinear: upstream behaviour (bilinear soft mask; tiny lesions can vanish at the loader's "
        "0.5 threshold; docs/method.md, 'Lesion masks at low resolution')",
    )
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild an existing --out whose source subjects or options differ from its record "
                        "(a new split of every subject; default: refuse naming the difference)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    root = preprocess(
        args.source,
        name=args.name,
        mod=args.mod,
        first=args.first,
        last=args.last,
        shape=args.shape,
        out=args.out,
        mask_resize=args.mask_resize,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(f"preprocessed data written to {root}")
    return root


if __name__ == "__main__":
    sys.exit(run_cli(main))
