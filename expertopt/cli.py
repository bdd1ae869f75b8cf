"""``expertopt`` command line: run the demo, or show how parameters are routed to optimizers.

    python -m expertopt demo [--world N] [--ep E] [--stage S] [--steps N] [--optimizer O] [--model M] [--out DIR]
    python -m expertopt groups [--model MODEL_TYPE] [--lr LR] [--adamw-lr LR] [--router {muon,adamw}]
                               [--expert-lr-mult M]

``groups`` prints what :func:`expertopt.build_param_groups` makes of the built-in TinyMoE, or with
``--model`` of any transformers architecture built from a tiny config (one row per parameter:
role, group, shape, layout, lr multiplier incl. sqrt(fan_out/fan_in), weight decay), so a
misrouted parameter (an embedding on Muon, an expert on AdamW, an inverted expert layout) is
visible before training.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expertopt.param_groups import build_param_groups

__all__ = ["format_groups", "main"]

# Parameter names shown per group before the list is cut short.
EXAMPLE_NAMES = 3
# Columns of the groups table: name, use_muon, expert, link, lr_mult, weight_decay, tensors, numel, names.
ROW = "{:<22} {:<5} {:<6} {:<6} {:>8} {:>5} {:>7} {:>8}  {}"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expertopt", description="Muon and AdamW for Mixture-of-Experts training."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a tiny transformers MoE on N CPU processes with DeepSpeed, Muon vs AdamW",
        description="Distributed MoE training on the Python stdlib's source (byte tokens): DeepSpeed "
        "ZeRO + AutoEP on local CPU processes, once with expertopt's Muon and once with AdamW.",
    )
    _add_demo_arguments(demo)

    groups = commands.add_parser(
        "groups", help="print the param groups built for the tiny MoE model or a transformers architecture"
    )
    groups.add_argument(
        "--model",
        metavar="MODEL_TYPE",
        help="a transformers model type (e.g. mixtral, gpt_oss, dbrx), built from a tiny config; "
        "needs the hf extra (pip install 'expertopt[hf]')",
    )
    groups.add_argument("--lr", type=float, default=0.02, help="Muon (scheduled) lr (default: 0.02)")
    groups.add_argument("--adamw-lr", type=float, default=3e-4, help="lr of AdamW groups (default: 3e-4)")
    groups.add_argument("--router", choices=("muon", "adamw"), default="muon", help="router optimizer")
    groups.add_argument(
        "--expert-lr-mult", type=float, default=1.0, help="lr multiplier of expert groups (default: 1.0)"
    )
    return parser


def format_groups(groups: list[dict[str, Any]]) -> str:
    """One line per group: routing keys, size and the first few parameter names."""
    header = ROW.format("group", "muon", "expert", "link", "lr_mult", "wd", "tensors", "numel", "names")
    lines = [header, "-" * len(header)]
    for group in groups:
        names = group.get("param_names", [])
        shown = ", ".join(names[:EXAMPLE_NAMES])
        if len(names) > EXAMPLE_NAMES:
            shown += f", ... (+{len(names) - EXAMPLE_NAMES})"
        lines.append(
            ROW.format(
                group["name"],
                str(group["use_muon"]),
                str(group["expert"]),
                str(group["link"]),
                f"{group['lr_mult']:.4g}",
                f"{group['weight_decay']:.3g}",
                len(group["params"]),
                sum(p.numel() for p in group["params"]),
                shown,
            )
        )
    return "\n".join(lines)


def _run_groups(args: argparse.Namespace) -> int:
    options = {
        "lr": args.lr,
        "adamw_lr": args.adamw_lr,
        "router": args.router,
        "expert_lr_mult": args.expert_lr_mult,
    }
    try:
        model, label = _groups_model(args.model)
        groups = build_param_groups(model, **options)
    except (ValueError, ImportError) as error:  # bad lrs, unknown model type, no transformers
        print(f"expertopt groups: {error}", file=sys.stderr)
        return 2
    settings = ", ".join(f"{key}={value!r}" for key, value in options.items())
    print(f"build_param_groups({label}, {settings}):")
    if args.model is not None:
        from expertopt.routing import route_model
        from expertopt.routing.table import format_routing, routing_rows

        routed = route_model(model, router=args.router)
        print(format_routing(routing_rows(routed, groups)))
        print()
    print(format_groups(groups))
    return 0


def _groups_model(model_type: str | None) -> tuple[Any, str]:
    """The built-in TinyMoE, or a transformers architecture from a tiny config."""
    import torch

    if model_type is None:
        from expertopt.models import TinyMoE

        torch.manual_seed(0)
        return TinyMoE(), "TinyMoE()"
    try:
        import transformers
    except ImportError:
        raise ImportError("--model needs transformers: pip install 'expertopt[hf]'") from None
    from expertopt.routing.tiny_transformers import build_tiny_model

    transformers.logging.set_verbosity_error()
    try:
        model = build_tiny_model(model_type)
    except ValueError:
        raise
    except Exception as error:  # transformers could not build this config small
        raise ValueError(
            f"{model_type!r} does not build from a tiny config: {type(error).__name__}: {error}"
        ) from None
    return model, f"tiny {type(model).__name__}"


def _add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    from expertopt.demo_config import OPTIMIZER_CHOICES, DemoConfig
    from expertopt.demo_models import DEMO_MODELS

    defaults = DemoConfig()
    demo.add_argument(
        "--world", type=int, default=defaults.world, help="CPU processes (default: 4; 1: one process)"
    )
    demo.add_argument(
        "--ep",
        type=int,
        default=None,
        help="AutoEP expert-parallel size; 1: every expert on every rank (default: 2 if --world is even, else 1)",
    )
    demo.add_argument("--stage", type=int, default=defaults.stage, help="ZeRO stage 0, 1 or 2 (default: 2)")
    demo.add_argument(
        "--steps", type=int, default=defaults.steps, help="training steps per optimizer (default: 200)"
    )
    demo.add_argument(
        "--optimizer", choices=sorted(OPTIMIZER_CHOICES), default=defaults.optimizer, help="default: both"
    )
    demo.add_argument(
        "--model", choices=sorted(DEMO_MODELS), default=defaults.model, help="default: qwen3_moe"
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=defaults.out,
        help="directory for the plot and results (default: ./expertopt-demo)",
    )
    demo.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the weights and the batches (default: 0)"
    )
    demo.add_argument(
        "--global-batch",
        type=int,
        default=defaults.global_batch,
        help="sequences per step, all ranks (default: 16)",
    )
    demo.add_argument("--muon-lr", type=float, default=defaults.muon_lr, help="Muon lr (default: 0.02)")
    demo.add_argument(
        "--muon-adamw-lr",
        type=float,
        default=defaults.muon_adamw_lr,
        help="lr of the Muon run's AdamW groups: embeddings, head, norms (default: 3e-3)",
    )
    demo.add_argument(
        "--adamw-lr", type=float, default=defaults.adamw_lr, help="AdamW baseline lr (default: 3e-3)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")  # fmt: skip


def _run_demo(args: argparse.Namespace) -> int:
    from expertopt.demo import run_demo
    from expertopt.demo_config import DemoConfig

    try:
        config = DemoConfig(
            world=args.world, ep=args.ep, stage=args.stage, steps=args.steps, optimizer=args.optimizer,
            model=args.model, out=args.out, seed=args.seed, global_batch=args.global_batch,
            muon_lr=args.muon_lr, muon_adamw_lr=args.muon_adamw_lr, adamw_lr=args.adamw_lr,
            progress=not args.no_progress,
        )  # fmt: skip
    except ValueError as error:  # a combination that cannot run: say what to change, no traceback
        print(f"expertopt demo: {error}", file=sys.stderr)
        return 2
    run_demo(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m expertopt`` and the ``expertopt`` console script."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error: argparse has printed why
        return int(exit_.code or 0)
    handlers = {"demo": _run_demo, "groups": _run_groups}
    return handlers[args.command](args)
