#!/usr/bin/env python
"""Parameter counts of the FPDM UNet and the three HAE variants, measured on the meta device.

Prints one table per configuration (the compare config of docs/hae.md, 'Parameter counts', and the BraTS
training config): total parameters, the split into encoder (input_blocks + time/label embeddings),
middle block, decoder (output_blocks + output head, without the hybrid blocks) and hybrid blocks,
and the change relative to the FPDM UNet and to HAE Lite.  The seed document's figures are shown
beside them, labelled as quoted (they were not measured here; see the note printed below the tables).

Usage:
    python compare_hae_versions.py [--json FILE] [--bottleneck_ratio 0.125 0.25 0.5 1.0]
    python compare_hae_versions.py --quality [--preset smoke|demo|recipe|paper ...]
    python compare_hae_versions.py --quality --summary DIR [--step N]

``--quality`` runs the denoiser comparison instead (segmentation quality and cost of the networks trained
alike, mean ± std over training seeds; all other flags are those of scripts/compare_denoisers.py, e.g.
``--rows v2 hae_v2 hae_skeleton hae_v2_b0.5 --train_seeds 0 1 2``). ``--quality --summary DIR`` runs
nothing and prints the quality table of a finished run: a denoiser comparison's ``--out`` (its table.md)
or a learning-curve summary's ``--out`` (scripts/summarise_curves.py; the table at ``--step``, default the
last step every row has), e.g. the README's verdict table.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from guided_diffusion.cli import ArgumentParser, run_cli
from guided_diffusion.hae_blocks import HybridCNNTransformerBlockBase
from guided_diffusion.registry import variant_options
from guided_diffusion.script_util import create_model

MODELS: tuple[tuple[str, str], ...] = (
    ("v2", "FPDM UNet"),
    ("hae", "HAE"),
    ("hae_lite", "HAE Lite"),
    ("hae_v2", "HAE V2"),
)

_COMMON = dict(image_size=128, in_channels=4, num_channels=128, num_res_blocks=2,
               attention_resolutions="32,16,8", dropout=0.1, learn_sigma=False, use_hae=True)
CONFIGS: dict[str, dict[str, Any]] = {
    "compare": dict(_COMMON, channel_mult="1,2,4,8", num_heads=8, use_scale_shift_norm=False,
                    class_cond=False, num_classes=None),
    "brats": dict(_COMMON, channel_mult="1,1,2,3,4", num_heads=4, use_scale_shift_norm=True,
                  class_cond=True, num_classes=2),
}
CONFIG_TITLES = {
    "compare": "compare config: 128 px, in/out 4, mc 128, mult (1,2,4,8), attention 32,16,8 (no 8 px level: "
               "attention at 32 and 16 px), 8 heads, no scale-shift, unconditional, dropout 0.1",
    "brats": "BraTS training config: 128 px, in/out 4, mc 128, mult (1,1,2,3,4), attention 32,16,8, "
             "4 heads, scale-shift, 2 classes (classifier-free), dropout 0.1",
}

# Figures quoted by HAE_V2_Implementation_Summary (seed); NOT measured by this script.
SEED_QUOTED_M = {"hae": 683.8, "hae_lite": 469.9, "hae_v2": 275.3, "v2": 261.4}
SEED_NOTE = (
    "Quoted figures come from the seed document, not from this code.  The FPDM figure (261.4 M) is the "
    "compare config above.  The HAE (683.8 M) and Lite (469.9 M) figures were measured on an earlier "
    "placement of the hybrid blocks (they replaced attention blocks, in the encoder and middle block "
    "too, which breaks the paper's 'CNN encoder, hybrid decoder' idea); the project places one hybrid "
    "block per decoder level except the finest.  275.3 M matches no code version: it equals "
    "469.9 M x (1 - 0.414) and was evidently estimated.  Only the measured columns describe this code."
)


def count(module: nn.Module | None) -> int:
    """Number of parameters of ``module`` (0 for None)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def breakdown(model: nn.Module) -> dict[str, int]:
    """Split a UNet's parameters into encoder / middle / decoder / hybrid (and total)."""
    hybrid = sum(count(m) for m in model.modules() if isinstance(m, HybridCNNTransformerBlockBase))
    encoder = count(model.input_blocks) + count(model.time_embed)
    encoder += count(getattr(model, "label_emb", None)) + count(getattr(model, "class_emb", None))
    middle = count(model.middle_block)
    decoder = count(model.output_blocks) + count(model.out) - hybrid
    total = count(model)
    if encoder + middle + decoder + hybrid != total:
        raise RuntimeError(f"{type(model).__name__}: the parameter groups do not add up to the total {total}")
    return dict(total=total, encoder=encoder, middle=middle, decoder=decoder, hybrid=hybrid)


def build(unet_ver: str, flags: dict[str, Any], bottleneck_ratio: float = 0.25) -> nn.Module:
    """Build a model through the registry on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"), warnings.catch_warnings():
        # the compare config lists an 8 px attention resolution that mult (1,2,4,8) never reaches
        warnings.filterwarnings("ignore", message=".*is not a feature-map size", category=UserWarning)
        # an option of the variants declaring it (hae_v2); the others refuse a non-default value
        ratio = {"bottleneck_ratio": bottleneck_ratio}
        own = ratio if "bottleneck_ratio" in variant_options(unet_ver) else {}
        return create_model(unet_ver=unet_ver, **own, **flags)


def pct(a: int, b: int) -> float:
    return 100.0 * (a - b) / b


def measure(config: str, bottleneck_ratio: float = 0.25) -> dict[str, dict[str, Any]]:
    """Breakdown of the four models for ``config`` with the changes vs FPDM and vs Lite (in %)."""
    rows = {ver: breakdown(build(ver, CONFIGS[config], bottleneck_ratio)) for ver, _ in MODELS}
    for row in rows.values():
        row["vs_fpdm_pct"] = round(pct(row["total"], rows["v2"]["total"]), 3)
        row["vs_lite_pct"] = round(pct(row["total"], rows["hae_lite"]["total"]), 3)
    return rows


def sweep(config: str, ratios: list[float]) -> list[dict[str, Any]]:
    """HAE V2's parameter count for each bottleneck ratio."""
    fpdm = count(build("v2", CONFIGS[config]))
    out = []
    for r in ratios:
        n = count(build("hae_v2", CONFIGS[config], r))
        out.append(dict(bottleneck_ratio=r, total=n, vs_fpdm_pct=round(pct(n, fpdm), 3)))
    return out


def format_table(config: str, rows: dict[str, dict[str, Any]]) -> str:
    head = (f"{'model':<10} {'unet_ver':<9} {'total':>13} {'encoder':>12} {'middle':>12} {'decoder':>12} "
            f"{'hybrid':>12} {'vs FPDM':>9} {'vs Lite':>9} {'seed (quoted)':>14}")
    lines = [f"== {CONFIG_TITLES[config]}", head, "-" * len(head)]
    for ver, name in MODELS:
        r = rows[ver]
        quoted = f"{SEED_QUOTED_M[ver]:.1f} M" if config == "compare" else "-"
        lines.append(
            f"{name:<10} {ver:<9} {r['total']:>13,} {r['encoder']:>12,} {r['middle']:>12,} "
            f"{r['decoder']:>12,} {r['hybrid']:>12,} {r['vs_fpdm_pct']:>+8.2f}% {r['vs_lite_pct']:>+8.2f}% "
            f"{quoted:>14}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quality", action="store_true",
                   help="run the denoiser comparison (scripts/compare_denoisers.py) with the other flags")
    p.add_argument("--json", default=None, help="also write the measured figures to this JSON file")
    p.add_argument("--bottleneck_ratio", type=float, nargs="*", default=[],
                   help="HAE V2 bottleneck ratios to sweep (each in (0, 1])")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.quality:
        return {"quality_exit_status": quality(list(argv if argv is not None else sys.argv[1:]))}
    from guided_diffusion.hae_blocks import check_bottleneck_ratio

    for r in args.bottleneck_ratio:
        check_bottleneck_ratio(r)
    if args.json and os.path.isdir(args.json):
        raise IsADirectoryError(f"--json {args.json} is a folder; expected the path of a JSON file to write")
    result: dict[str, Any] = {"configs": {}, "bottleneck_sweep": {},
                              "seed_quoted_millions": SEED_QUOTED_M, "seed_note": SEED_NOTE}
    for config in CONFIGS:
        rows = measure(config)
        result["configs"][config] = {"title": CONFIG_TITLES[config], "flags": CONFIGS[config], "models": rows}
        print(format_table(config, rows))
        print()
    print("Seed figures (quoted, not measured; compare config):", ", ".join(
        f"{name} {SEED_QUOTED_M[ver]:.1f} M" for ver, name in MODELS))
    print("Note:", SEED_NOTE)
    if args.bottleneck_ratio:
        print()
        print("== HAE V2 bottleneck_ratio sweep (measured)")
        print(f"{'ratio':>8} {'compare total':>15} {'vs FPDM':>9} {'BraTS total':>15} {'vs FPDM':>9}")
        sweeps = {config: sweep(config, args.bottleneck_ratio) for config in CONFIGS}
        result["bottleneck_sweep"] = sweeps
        for a, b in zip(sweeps["compare"], sweeps["brats"]):
            print(f"{a['bottleneck_ratio']:>8g} {a['total']:>15,} {a['vs_fpdm_pct']:>+8.2f}% "
                  f"{b['total']:>15,} {b['vs_fpdm_pct']:>+8.2f}%")
    if args.json:
        from guided_diffusion.utils.io_util import atomic_write_json

        atomic_write_json(result, args.json)
        print(f"\nwrote {args.json}")
    return result


def quality(argv: list[str]) -> int:
    """``--quality``: the denoiser comparison (guided_diffusion.experiments.denoiser_comparison) with the
    other flags."""
    rest = [a for a in argv if a != "--quality"]
    if any(a == "--summary" or a.startswith("--summary=") for a in rest):
        return run_cli(print_quality_summary, rest)
    from guided_diffusion.experiments.denoiser_comparison import main as compare_main

    return run_cli(compare_main, rest)


def print_quality_summary(argv: list[str]) -> int:
    """``--quality --summary DIR [--step N]``: print the quality table stored in DIR, running nothing."""
    import json

    from guided_diffusion.experiments.curves_summary import differences, differences_md, table_md

    p = ArgumentParser(description="print the quality table of a finished comparison or curve summary")
    p.add_argument("--summary", required=True,
                   help="a compare_denoisers.py --out folder (table.md) or a summarise_curves.py --out "
                        "folder (summary.json)")
    p.add_argument("--step", type=int, default=None,
                   help="curve summaries: the table's training step (default: the last step every row has)")
    args = p.parse_args(argv)
    curves, table = os.path.join(args.summary, "summary.json"), os.path.join(args.summary, "table.md")
    if os.path.isfile(curves):
        with open(curves, encoding="utf-8") as f:
            record = json.load(f)
        groups = {k: record["groups"][k] for k in record.get("group_order", record["groups"])}
        print(table_md(groups, args.step))
        if record.get("reference"):
            step = args.step or record["step"]
            print(differences_md(differences(groups, record["reference"], step), record["reference"], step))
        print(f"Produced by: `{record['command']}`")
    elif os.path.isfile(table):
        if args.step is not None:
            raise ValueError(f"--step applies to learning-curve summaries; {args.summary} is a denoiser "
                             "comparison (one training budget)")
        with open(table, encoding="utf-8") as f:
            print(f.read())
    else:
        raise FileNotFoundError(f"--summary {args.summary}: expected summary.json (scripts/"
                                "summarise_curves.py --out) or table.md (scripts/compare_denoisers.py "
                                "--out) in it")
    return 0


if __name__ == "__main__":
    if "--quality" in sys.argv[1:]:
        sys.exit(quality(sys.argv[1:]))
    sys.exit(run_cli(main))
