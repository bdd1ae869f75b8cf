"""``expertopt`` command line: run the demo, or show how parameters are routed to optimizers.

    python -m expertopt demo [--steps N] [--seed S] [--threads T]
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

    demo = commands.add_parser("demo", help="train a tiny MoE with Muon and with AdamW and compare losses")
    demo.add_argument(
        "--steps", type=_positive_int, default=300, help="training steps per optimizer (default: 300)"
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the initial weights and the data (default: 0)"
    )
    demo.add_argument(
        "--threads", type=_positive_int, default=1, help="torch intra-op threads (default: 1, fastest here)"
    )

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


def _run_demo(args: argparse.Namespace) -> int:
    from expertopt.demo import run_demo

    run_demo(steps=args.steps, seed=args.seed, num_threads=args.threads)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m expertopt`` and the ``expertopt`` console script."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error: argparse has printed why
        return int(exit_.code or 0)
    handlers = {"demo": _run_demo, "groups": _run_groups}
    return handlers[args.command](args)
