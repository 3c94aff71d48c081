"""`rqlab zoo`: list, show and build the model zoo.

    rqlab zoo list                      # every recipe with its measured numbers
    rqlab zoo show fmnist-q4-pgd7-small       # its card and the command that reproduces it
    rqlab zoo build                     # train every CPU recipe not built yet (resumable)
    rqlab zoo build fmnist-q4-pgd7-small --force
    rqlab zoo audit                     # re-run every card's sanity audit (weights untouched)
    rqlab zoo measure                   # every card's headline: the standard protocol on 500 examples
    rqlab zoo curves --out curves.png   # the full-budget models' held-out curves (and those training)
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
    b.add_argument("--protocol", default="standard", choices=("quick", "standard"),
                   help="standard (default): measure the card's headline with the standard protocol after "
                        "training (as `rqlab zoo measure`); quick: PGD-20 and the audit only")
    add_standard_flags(b)
    b.set_defaults(run=run_build)
    a = actions.add_parser("audit", help="re-run the sanity audit of built models into their cards",
                           description="The sanity checks of METHODS section 6 (Square and transfer from FP "
                                       "beside PGD-20) on 100 test examples, written into each card.")
    a.add_argument("names", nargs="*", help="models to audit (default: every built model)")
    a.add_argument("--device", default="cpu", help="cpu | cuda")
    a.set_defaults(run=run_audit)
    m = actions.add_parser("measure", help="measure each card's headline with the standard protocol (resumable)",
                           description="The standard protocol of METHODS section 8 (AutoAttack standard + PGD-20; "
                                       "for random precisions the support ensemble + EOT-PGD + expectation; for "
                                       "binary ones Square and BPDA too) at each card's first precision, written "
                                       "into the card; models already measured the same way are skipped.")
    m.add_argument("names", nargs="*", help="models to measure (default: every built model)")
    m.add_argument("--device", default="cpu", help="cpu | cuda")
    m.add_argument("--force", action="store_true", help="remeasure cards already measured the same way")
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("--channels-last", action="store_true",
                   help="the model in NHWC memory format (faster on CPUs too; recorded in the card)")
    add_standard_flags(m)
    m.set_defaults(run=run_measure)
    c = actions.add_parser("curves", help="plot the held-out training curves of the full-budget models",
                           description="Held-out clean and PGD-20 accuracy per epoch of each built full-budget "
                                       "model (each one's gain over its last 3 epochs in the legend: the plateau "
                                       "check of issue 14), and, dashed, of the models training in --runs.")
    c.add_argument("names", nargs="*", help="zoo models (default: every full-budget recipe)")
    c.add_argument("--out", required=True, help="the figure to write (.png, .svg or .pdf)")
    c.add_argument("--runs", default=None,
                   help="also draw models still training there (default: the zoo's runs folder, runs/zoo)")
    c.add_argument("--built-only", action="store_true", help="draw only the built models (the docs' figure)")
    c.set_defaults(run=run_curves)


def add_standard_flags(p) -> None:
    """The standard protocol's size and budget (reference AutoAttack unless cut)."""
    p.add_argument("--standard-n", type=int, default=None,
                   help="test examples of the headline (default 500, the first of the card's subset)")
    p.add_argument("--aa-iters", type=int, default=None,
                   help="AutoAttack iterations (default 100, the reference; fewer only for smoke runs)")
    p.add_argument("--aa-targets", type=int, default=None, help="APGD-T/FAB-T target classes (default 9)")
    p.add_argument("--square-queries", type=int, default=None, help="Square's queries (default 5000)")


def standard_options(args) -> dict | None:
    """The standard protocol's options the flags set (None: the reference budget)."""
    options = {k: v for k, v in (("n_iter", args.aa_iters), ("n_target_classes", args.aa_targets),
                                 ("n_queries", args.square_queries)) if v is not None}
    return options or None


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
                   progress=not args.no_progress, protocol=args.protocol, options=standard_options(args),
                   standard_n=args.standard_n)
    return 0


def run_measure(args) -> int:
    from .. import zoo

    zoo.measure_many(args.names, n=args.standard_n, device=args.device, options=standard_options(args),
                     force=args.force, progress=not args.no_progress, channels_last=args.channels_last)
    return 0


def run_curves(args) -> int:
    from .. import zoo
    from ..report import zoo_curves

    curves = zoo_curves.zoo_curves(args.names or None, runs=None if args.built_only else args.runs or zoo.RUNS)
    out = zoo_curves.write_figure(curves, args.out)
    for name, c in curves.items():
        p = c["plateau"]
        gain = "-" if p["gain"] is None else f"{100 * p['gain']:+.1f} pts"
        print(f"{name}: {c['status']}, {len(c['history'])}/{c['epochs']} epochs, {p['key']} over the last "
              f"{p['window']}: {gain}{'' if p['plateaued'] or c['status'] == 'training' else ' (not plateaued)'}")
    print(f"wrote {out}")
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
