"""`rqlab zoo`: list, show and build the model zoo.

    rqlab zoo list                      # every recipe with its measured numbers
    rqlab zoo show fmnist-q4-pgd7       # its card and the command that reproduces it
    rqlab zoo build                     # train every CPU recipe not built yet (resumable)
    rqlab zoo build fmnist-q4-pgd7 --force
    rqlab zoo audit                     # re-run every card's sanity audit (weights untouched)
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
    a = actions.add_parser("audit", help="re-run the sanity audit of built models into their cards",
                           description="The sanity checks of METHODS section 6 (Square and transfer from FP "
                                       "beside PGD-20) on 100 test examples, written into each card.")
    a.add_argument("names", nargs="*", help="models to audit (default: every built model)")
    a.add_argument("--device", default="cpu", help="cpu | cuda")
    a.set_defaults(run=run_audit)


def run_list(args) -> int:
    from .. import zoo

    print(zoo.table())
    return 0


def run_show(args) -> int:
    from .. import zoo

    print(zoo.show(args.name) if args.name in zoo.RECIPES else zoo.recipe(args.name))
    return 0


def run_build(args) -> int:
    from .. import zoo
    from ..checkpoint import check_output_dir

    for n in args.names:
        zoo.recipe(n)  # unknown names fail before any work
    check_output_dir(zoo.RUNS, "zoo runs folder (in the working directory)")
    check_output_dir(zoo.STORE, "zoo store")

    zoo.build_many(args.names, force=args.force, device=args.device, threads=args.threads,
                   progress=not args.no_progress)
    return 0


def run_audit(args) -> int:
    from .. import zoo
    from ..checkpoint import check_output_dir

    for n in args.names:
        zoo.recipe(n)  # unknown names fail before any work
    check_output_dir(zoo.STORE, "zoo store")  # the cards are rewritten there
    for n in args.names or zoo.names(trained_only=True):
        zoo.audit(n, device=args.device)
    return 0
