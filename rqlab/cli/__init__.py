"""The `rqlab` command line.

    rqlab data fetch fashion-mnist [--root DIR]
    rqlab data info cifar10

Each subcommand is a function `cmd_<name>(args) -> int` plus a function that adds its
parser and sets `run=cmd_<name>` as a default; to add one, write both and list the parser
function in SUBCOMMANDS. Errors of type RqlabError are printed as `rqlab: error: <message>`
(exit code 2), without a traceback. Heavy modules (torch) are imported inside the
commands, so `rqlab --help` is fast.
"""
from __future__ import annotations

import argparse
import sys

from rqlab import __version__
from rqlab.cli import bitselect as bitselect_cmd, eval as eval_cmd, report as report_cmd, train as train_cmd, zoo as zoo_cmd
from rqlab.validate import RqlabError


def cmd_data_fetch(args) -> int:
    from rqlab import data

    where = data.fetch(args.name, root=args.root)
    print(f"{args.name}: ready at {where}")
    return 0


def cmd_data_info(args) -> int:
    from rqlab import data

    info = data.dataset_info(args.name)
    print(f"{info.name} (torchvision.datasets.{info.torchvision_class})")
    print(f"  input shape  {info.input_shape} (C, H, W), {info.num_classes} classes")
    for split, size in info.sizes.items():
        print(f"  {split:<12} {size} examples")
    print(f"  mean         {info.mean}")
    print(f"  std          {info.std}")
    print(f"  classes      {', '.join(info.classes)}")
    print(f"  stored at    {info.path(data.data_root(args.root))}")
    return 0


def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="fetch datasets and show their metadata")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, run, help_text in (
        ("fetch", cmd_data_fetch, "make a dataset available offline (both splits)"),
        ("info", cmd_data_info, "print sizes, shape, mean/std and classes"),
    ):
        a = actions.add_parser(action, help=help_text)
        a.add_argument("name", metavar="NAME", help="dataset, e.g. fashion-mnist or cifar10")
        a.add_argument("--root", metavar="DIR", default=None,
                       help="data root (default: $RQLAB_DATA, else ~/.cache/rqlab/data)")
        a.set_defaults(run=run)


# One function per subcommand: it adds the subcommand's parser and sets `run`.
SUBCOMMANDS = [add_data_parser, train_cmd.add_cli, eval_cmd.add_cli, bitselect_cmd.add_cli, report_cmd.add_cli,
               zoo_cmd.add_cli]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rqlab", description="Adversarial robustness of quantized neural networks.")
    parser.add_argument("--version", action="version", version=f"rqlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default sys.argv[1:]); return the exit code."""
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for `--nproc N`, which relaunches it
    except SystemExit as exit_:  # --help, --version, usage errors: argparse has printed
        return int(exit_.code or 0)
    try:
        return args.run(args)
    except RqlabError as err:
        print(f"rqlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
