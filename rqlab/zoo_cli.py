"""`rqlab zoo`: list, show and build the model zoo.

    rqlab zoo list                      # every recipe with its measured numbers
    rqlab zoo show fmnist-q4-pgd7       # its card and the command that reproduces it
    rqlab zoo build                     # train every CPU recipe not built yet (resumable)
    rqlab zoo build fmnist-q4-pgd7 --force
"""
from __future__ import annotations


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("zoo", help="list, show and build the model zoo",
                              description="Named, reproducible models with measured accuracies.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every recipe with its measured numbers").set_defaults(run=run_list)
    s = actions.add_parser("show", help="a model's card and how to reproduce it")
    s.add_argument("name")
    s.set_defaults(run=run_show)
    b = actions.add_parser("build", help="train, measure and store recipes (resumable)")
    b.add_argument("names", nargs="*", help="recipes to build (default: every CPU recipe)")
    b.add_argument("--force", action="store_true", help="retrain from scratch even if built")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(run=run_build)


def run_list(args) -> int:
    from . import zoo

    print(zoo.table())
    return 0


def run_show(args) -> int:
    from . import zoo

    print(zoo.show(args.name) if args.name in zoo.RECIPES else zoo.recipe(args.name))
    return 0


def run_build(args) -> int:
    from . import zoo

    zoo.build_many(args.names, force=args.force, device=args.device, threads=args.threads,
                   progress=not args.no_progress)
    return 0
