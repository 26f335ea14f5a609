"""Train the HAE UNet V2 (``unet_ver="hae_v2"``): ``scripts/train.py`` with ``--unet_ver`` forced.

Takes every flag of ``scripts/train.py``; ``--use_hae`` and ``--bottleneck_ratio`` (in (0, 1],
default 0.25) come from the command line. Before training it prints the HAE settings and the
parameter count of the network the flags describe (counted on the meta device, no memory used).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from guided_diffusion.hae_blocks import HybridCNNTransformerBlockBase, check_bottleneck_ratio  # noqa: E402
from guided_diffusion.nn import count_parameters, format_param_count  # noqa: E402
from guided_diffusion.script_util import args_to_dict, create_model_and_diffusion  # noqa: E402
from guided_diffusion.script_util import model_and_diffusion_defaults as _md_defaults  # noqa: E402

HAE_V2_OVERRIDES: dict[str, Any] = {"unet_ver": "hae_v2"}


def load_train_script() -> ModuleType:
    """Import ``scripts/train.py`` by path (the scripts folder is not a package)."""
    path = ROOT / "scripts" / "train.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; train_hae_v2.py is a wrapper around it")
    spec = importlib.util.spec_from_file_location("hae_fpdm_train_script", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def describe(args: Any) -> str:
    """One line with the HAE V2 settings and the parameter counts of the model the flags build."""
    flags = args_to_dict(args, _md_defaults().keys())
    flags.update(HAE_V2_OVERRIDES)
    flags["class_cond"] = bool(flags.get("num_classes") and flags["num_classes"] > 0)
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**flags)
    total = count_parameters(model)
    hybrid = sum(count_parameters(m) for m in model.modules() if isinstance(m, HybridCNNTransformerBlockBase))
    return (f"HAE V2: unet_ver=hae_v2 use_hae={flags['use_hae']} "
            f"bottleneck_ratio={flags['bottleneck_ratio']} {format_param_count(total)}, "
            f"hybrid blocks {format_param_count(hybrid)}")


def main(argv: list[str] | None = None) -> int:
    """Parse the train.py flags, report the HAE V2 settings, then train with ``unet_ver`` forced."""
    train_script = load_train_script()
    args = train_script.build_arg_parser().parse_args(argv)
    try:
        check_bottleneck_ratio(args.bottleneck_ratio)
        print(describe(args), flush=True)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return train_script.main(argv, overrides=HAE_V2_OVERRIDES)


if __name__ == "__main__":
    sys.exit(main())
