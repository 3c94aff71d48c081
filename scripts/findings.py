"""Measure what docs/findings.md reports, from the zoo models, and print it as Markdown.

    .venv/bin/python scripts/findings.py                 # every section (about 30 min on 2 CPU cores)
    .venv/bin/python scripts/findings.py --section b     # one section: a, b, c, d or t (transfer, behind b)
    .venv/bin/python scripts/findings.py --section B     # (b) under the standard protocol, same-model control
                                                         # (full-budget models once built: --n 1000, their cards' n)
    .venv/bin/python scripts/findings.py --section A     # (a)'s two robustness claims under the standard protocol
    .venv/bin/python scripts/findings.py --n 200         # fewer test examples, faster

Each section writes its numbers to docs/findings/<section>.json (atomically) and prints
the tables pasted into docs/findings.md. Test examples: the first N of the seed-0 subset
of the Fashion-MNIST test split; attacks: linf eps 0.1, PGD-20 step 0.01 (METHODS section 0).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import rqlab
from rqlab import bitselect, checkpoint, data, quant, zoo
from rqlab.analysis import sweeps
from rqlab.analysis.adaptive import evaluate_protocols
from rqlab.analysis.curves import epoch_time_ratio
from rqlab.attacks import ThreatModel
from rqlab.evaluation import evaluate
from rqlab.studies.odgq_curves import zoo_curves

OUT = Path(__file__).resolve().parent.parent / "docs" / "findings"
PGD20 = ThreatModel("pgd", eps=0.1, steps=20)
RPI = (4, 5, 6, 7, 8)
AA_ITERS = 25  # APGD iterations of AutoAttack (reference: 100), a CPU budget


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def ci(rec: dict, key: str = "robust") -> str:
    lo, hi = rec[f"{key}_ci95"]
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


CONTROL = Path("runs/findings/fmnist-fp-natural-6k")
# the w32a4 zoo recipes' budget (6,000 images, 4 epochs) at FP, natural training
CONTROL_SPEC = rqlab.RunSpec(model="smallcnn", data="fashion-mnist", policy="fp", defense="natural",
                             train=rqlab.TrainConfig(epochs=4, n_train=6000, seed=0))


def same_budget_fp_control():
    """An FP natural SmallCNN trained like the w32a4 zoo models (6,000 images, 4 epochs):
    the zoo's fmnist-fp-natural-small saw all 60,000 images, and a smaller training set alone
    changes PGD robustness. Trained once into runs/findings/ (rqlab.train(CONTROL_SPEC);
    resumed when interrupted), calibrated at 2..8 bits as the zoo calibrates."""
    print(f"  the same-budget FP control: {CONTROL_SPEC.command(CONTROL)}", file=sys.stderr, flush=True)
    model, _ = rqlab.train(CONTROL_SPEC, CONTROL, progress=False, log=None)
    calib = data.load("fashion-mnist", "train", n=zoo.CALIBRATE_N, seed=1).x.float() / 255
    quant.calibrate(model, [calib[i:i + 256] for i in range(0, len(calib), 256)], bits=list(zoo.CALIBRATE_BITS))
    return model.eval()


def section_a(test, n: int) -> dict:
    """FP vs vanilla quantized vs DQ: accuracy against activation bits, error amplification."""
    names = {"FP (natural)": "fmnist-fp-natural-small", "vanilla w32a4 (natural)": "fmnist-a4-natural-small",
             "DQ w32a4 (natural, beta 3e-3)": "fmnist-dq-natural-small"}
    models = {k: zoo.load(v) for k, v in names.items()}
    models["FP (natural, 6k images like the others)"] = same_budget_fp_control()
    bits = [1, 2, 4, 8, 32]
    table = {k: sweeps.accuracy_vs_bits(m, test, PGD20, bits, act_only=True, n=n) for k, m in models.items()}
    print("\n### (a) Accuracy against activation bits (weights FP), PGD-20 eps 0.1, n =", n)
    print("\n| model | " + " | ".join(f"a{b if b < 32 else 'FP'} clean / PGD-20" for b in bits) + " |")
    print("|---|" + "---|" * len(bits))
    for k, rows in table.items():
        print(f"| {k} | " + " | ".join(f"{pct(r['clean_accuracy'])} / {pct(r['robust_accuracy'])}" for r in rows) + " |")

    # Each model at its own precision (as stored: FP, or w32a4): attacked white-box, and
    # all fed the same inputs crafted on the FP model.
    x, y = test.x[:n].float() / 255, test.y[:n]
    amp = sweeps.amplification(models, x, sweeps.craft_all(models, x, y, PGD20, craft_on="each"))
    shared = sweeps.amplification(models, x, sweeps.craft_all(models, x, y, PGD20, craft_on="FP (natural)"))
    layers = amp["FP (natural)"]["layers"]
    for title, d in (("white-box PGD-20 on each model", amp), ("PGD-20 crafted on the FP model, same inputs", shared)):
        print(f"\n### (a) Error amplification D_l = mean ||a_l(x_adv) - a_l(x)|| / ||a_l(x)|| ({title})")
        print("\n| model | " + " | ".join(layers) + " |")
        print("|---|" + "---|" * len(layers))
        for k, v in d.items():
            print(f"| {k} | " + " | ".join(f"{a:.3f}" for a in v["amplification"]) + " |")
    return {"accuracy_vs_act_bits": table, "amplification_whitebox": amp, "amplification_shared": shared, "n": n}


def section_b(test, n: int, aa_n: int, passes: int = 5) -> dict:
    """RPI and RPT under the paper's protocol and under adaptive attacks."""
    rpi = quant.RandomPrecision(RPI, seed=0)
    configs = {"PGD-7 AT, FP": ("fmnist-fp-pgd7-small", quant.Fixed(32)),
               "PGD-7 AT (8-bit) + RPI 4..8": ("fmnist-q8-pgd7-small", rpi),
               "RPT 4..8 + RPI 4..8": ("fmnist-rpt-pgd7-small", rpi)}
    rows = []
    for label, (name, policy) in configs.items():
        model = zoo.load(name)
        row = {"config": label, "model": name, "policy": policy.to_dict(),
               "bitops_g": quant.bitops(model, policy) / 1e9}
        scores = evaluate_protocols(model, policy, test, eps=0.1, steps=20, adaptive=("eot_pgd", "expectation"),
                                    passes=passes, n=n)
        row.update({k: v["robust_accuracy"] for k, v in scores.items()}, clean=scores["paper"]["clean_accuracy"],
                   worst={k: v["robust_worst_accuracy"] for k, v in scores.items()},
                   ci95={k: v["robust_ci95"] for k, v in scores.items()})
        row["autoattack"] = evaluate_protocols(model, policy, test, eps=0.1, adaptive=("autoattack",), passes=passes,
                                               n=aa_n, aa_n_iter=AA_ITERS)["autoattack"]["robust_accuracy"]
        if isinstance(policy, quant.RandomPrecision):
            # The attacker crafts at one precision drawn from the set and the defender runs
            # RPI; the expected outcome over the draw is the mean over the set's precisions.
            per_b = [evaluate(model, test, PGD20.replace(policy=quant.Fixed(b)), policy=policy, n=n, passes=passes,
                              progress=False)["robust_accuracy"] for b in RPI]
            row["one_drawn_precision"] = statistics.mean(per_b)
            row["one_drawn_precision_per_bits"] = dict(zip(map(str, RPI), per_b))
        rows.append(row)
        print(f"  done {label}", file=sys.stderr, flush=True)
    print(f"\n### (b) RPI and RPT, eps 0.1, n = {n} ({passes} stochastic passes for random policies, mean "
          f"accuracy; AutoAttack on n = {aa_n} with {AA_ITERS} APGD iterations, not the reference 100)")
    print("\n| configuration | GBitOPs | clean | PGD-20 crafted at one drawn b | PGD-20, the model draws b every "
          "forward (paper) | EOT-PGD (K=10) | expectation over 4..8 | AutoAttack (rand for RPI) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = lambda k: pct(r[k]) if k in r else "-"  # noqa: E731
        print(f"| {r['config']} | {r['bitops_g']:.3f} | {pct(r['clean'])} | {g('one_drawn_precision')} | "
              f"{g('paper')} | {g('eot_pgd')} | {g('expectation')} | {g('autoattack')} |")
    return {"rows": rows, "n": n, "passes": passes}


def standard_record(name: str, policy, test, n: int, passes: int, model=None, folder: str = "b_standard"):
    """The standard protocol's record of zoo model `name` (or of `model`, named `name`) at
    `policy` on the first n test examples (the card's subset): the card's own record when it
    is this one (`rqlab zoo measure`), else measured here and kept in docs/findings/<folder>/
    (so a stopped run resumes). Reference budget: AutoAttack standard, 100 iterations,
    Square 5,000 queries."""
    from rqlab.record import Record

    c = zoo.card(name) if model is None else {}
    s = c.get("standard")
    if s and s["n"] == n and s["policy"] == policy.to_dict() and s["passes"] == passes and not s["requested_options"]:
        return zoo.standard_record(name)
    path = OUT / folder / f"{name}__{str(policy).replace('(', '').replace(')', '')}__n{n}.json"
    if path.is_file():
        return Record.from_json(path.read_text())
    print(f"  standard protocol: {name} at {policy}, n = {n} ...", file=sys.stderr, flush=True)
    progress = path.with_suffix(".progress")  # finished batches: a stopped run resumes there
    rec = evaluate(zoo.load(name) if model is None else model, test, PGD20, policy=policy, n=n, passes=passes,
                   protocol="standard", model_id=name, progress=False, batch_size=zoo.MEASURE_BATCH, resume=progress)
    checkpoint.save_json(path, rec.to_dict())
    return rec


def record_summary(rec) -> dict:
    """What the findings' JSON keeps of a standard-protocol record (per-example scores stay in the record)."""
    return {"clean": rec["clean_accuracy"], "robust": rec["robust_accuracy"], "ci95": rec["robust_ci95"],
            "worst": rec["robust_worst_accuracy"], "strongest": rec["strongest"],
            "attacks": {a["name"]: a["robust_accuracy"] for a in rec.attacks},
            "unreliable": list(rec.unreliable), "wall_time_s": rec["wall_time_s"],
            "device": rec.get("device_name") or rec["device"]}


def full_or_small(*names: str) -> tuple[str, ...]:
    """The full-budget zoo models (issue 14) when every one of `names` is built, else their
    -small variants: a section compares like with like."""
    built = set(zoo.names(trained_only=True))
    return names if set(names) <= built else tuple(f"{n}-small" for n in names)


def section_b_standard(test, n: int, passes: int = 5) -> dict:
    """(b) under the standard protocol, with the control it lacked: each random-precision
    model against the same model at a fixed precision, same images, same AutoAttack."""
    from rqlab.stats import paired_difference

    rpi = quant.RandomPrecision(RPI, seed=0)
    q8, rpt, fp_name = full_or_small("fmnist-q8-pgd7", "fmnist-rpt-pgd7", "fmnist-fp-pgd7")
    pairs = {f"PGD-7 AT at 8 bits ({q8})": q8, f"RPT 4..8 ({rpt})": rpt}
    # the two records the cards lack first; the cards' own (q8 at 8, RPT under RPI) come
    # from `rqlab zoo measure` when it has run (same n), else they are measured here
    standard_record(q8, rpi, test, n, passes)
    standard_record(rpt, quant.Fixed(8), test, n, 1)
    rows = []
    for label, name in pairs.items():
        fixed = standard_record(name, quant.Fixed(8), test, n, 1)
        rand = standard_record(name, rpi, test, n, passes)
        diff, (lo, hi) = paired_difference(rand.robust_scores(), fixed.robust_scores())
        row = {"config": label, "model": name, "n": n, "passes": passes, "difference": diff, "difference_ci95": [lo, hi]}
        for key, rec in (("fixed8", fixed), ("rpi", rand)):
            row[key] = record_summary(rec)
        rows.append(row)
    fp = zoo.card(fp_name).get("standard")
    print(f"\n### (b) The standard protocol, the same model at a fixed 8 bits and under RPI 4..8, n = {n} "
          f"(RPI scored over {passes} passes, mean)")
    print("\n| model | precision | clean | standard protocol [95% CI] | AutoAttack | PGD-20 / EOT-PGD / expectation "
          "| RPI - fixed, same images [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for key, prec in (("fixed8", "8 (fixed)"), ("rpi", "RPI 4..8")):
            v = r[key]
            others = " / ".join(pct(v["attacks"][k]) if k in v["attacks"] else "-"
                                for k in ("pgd", "eot_pgd", "expectation"))
            last = (f"{100 * r['difference']:+.1f} [{100 * r['difference_ci95'][0]:+.1f}, "
                    f"{100 * r['difference_ci95'][1]:+.1f}]") if key == "rpi" else ""
            print(f"| {r['model']} | {prec} | {pct(v['clean'])} | {pct(v['robust'])} [{pct(v['ci95'][0])}, "
                  f"{pct(v['ci95'][1])}] | {pct(v['attacks']['autoattack'])} | {others} | {last} |")
    if fp:
        print(f"| {fp_name} | FP | {pct(fp['clean_accuracy'])} | {pct(fp['robust_accuracy'])} "
              f"[{pct(fp['robust_ci95'][0])}, {pct(fp['robust_ci95'][1])}] | {pct(fp['attacks']['autoattack'])} | "
              f"{pct(fp['attacks']['pgd'])} / - / - | |")
    return {"rows": rows, "n": n, "passes": passes, "fp_pgd7_card": fp}


def section_a_standard(test, n: int) -> dict:
    """(a)'s robustness claims under the standard protocol, paired on the same n images: the
    paper says vanilla quantization is less robust than FP (FP control minus vanilla w32a4 > 0)
    and that DQ is more robust than vanilla (DQ minus vanilla > 0). Models as in section a,
    each at its own precision; the zoo models' records are their cards' (`rqlab zoo measure`)."""
    from rqlab.report.claims import verdict
    from rqlab.stats import paired_difference

    fp, a4 = quant.Fixed(32), quant.Fixed(32, act_bits=4)
    recs = {"FP natural, 60k (fmnist-fp-natural-small)": standard_record("fmnist-fp-natural-small", fp, test, n, 1),
            "FP natural, 6k (control)": standard_record("fmnist-fp-natural-6k", fp, test, n, 1,
                                                        model=same_budget_fp_control(), folder="a_standard"),
            "vanilla w32a4, 6k (fmnist-a4-natural-small)": standard_record("fmnist-a4-natural-small", a4, test, n, 1),
            "DQ w32a4 beta 3e-3, 6k (fmnist-dq-natural-small)": standard_record("fmnist-dq-natural-small", a4,
                                                                               test, n, 1)}
    rows = [{"model": k, **record_summary(r)} for k, r in recs.items()]
    control, vanilla, dq = (recs[k].robust_scores() for k in list(recs)[1:])
    claims = []
    for claim, better, worse in (("vanilla w32a4 is less robust than FP (FP control - vanilla)", control, vanilla),
                                 ("DQ is more robust than vanilla (DQ - vanilla)", dq, vanilla)):
        diff, ci95 = paired_difference(better, worse)
        claims.append({"claim": claim, "difference": diff, "difference_ci95": list(ci95), "verdict": verdict(ci95)})
    print(f"\n### (a) under the standard protocol, n = {n}, each model at its own precision")
    print("\n| model | clean | standard protocol [95% CI] | strongest | PGD-20 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {pct(r['clean'])} | {pct(r['robust'])} [{pct(r['ci95'][0])}, {pct(r['ci95'][1])}] "
              f"| {r['strongest']} | {pct(r['attacks']['pgd']) if 'pgd' in r['attacks'] else '-'} |")
    print("\n| the paper's claim | difference, paired [95% CI] | verdict |")
    print("|---|---|---|")
    for c in claims:
        print(f"| {c['claim']} | {100 * c['difference']:+.1f} [{100 * c['difference_ci95'][0]:+.1f}, "
              f"{100 * c['difference_ci95'][1]:+.1f}] | **{c['verdict']}** |")
    return {"rows": rows, "claims": claims, "n": n}


def section_c(test, n: int) -> dict:
    """Lipschitz-guided bit selection against uniform, random and reverse at equal budgets."""
    (name,) = full_or_small("fmnist-fp-pgd7")
    model = zoo.load(name)
    rows = bitselect.compare_allocations(model, test, PGD20, budgets=[3.0, 4.0, 5.0], n=n, random_seeds=3)
    print(f"\n### (c) Bit allocation on {name} (PTQ, per-layer bits of conv2, conv3, fc1), "
          f"PGD-20 eps 0.1, n = {n}")
    print("\n| budget (avg bits) | method | bits | avg bits | objective | clean | PGD-20 [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        label = r["method"] + (f" (seed {r['seed']})" if r.get("seed") is not None else "")
        print(f"| {r['budget']:g} | {label} | {', '.join(str(b) for b in r['bits'].values())} | "
              f"{r['avg_bits']:.2f} | {r['objective']:.2f} | {pct(r['clean_accuracy'])} | "
              f"{pct(r['robust_accuracy'])} {ci(r)} |")
    return {"rows": rows, "n": n, "model": name}


def section_d() -> dict:
    """ODG-Q: epoch time and robust accuracy against natural, FGSM-RS and PGD-7 AT at 4 bits."""
    curves = zoo_curves(4)
    ratios = epoch_time_ratio(curves)
    cards = {m: zoo.card(c["source"].removeprefix("zoo ")) for m, c in curves.items()}
    small = cards["odgq"]["name"].endswith("-small")  # zoo_curves never mixes the two zoos
    cards["odgq-binary"] = zoo.card("fmnist-odgq-bin" + ("-small" if small else ""))
    per_epoch_n = cards["odgq"]["recipe"]["spec"]["eval_pgd"]
    budget = "6,000 images for 4 epochs" if small else "all 60,000 images for 15 epochs (10 for natural training)"
    print(f"\n### (d) Training at 4 bits on {budget} (zoo histories); final accuracy on the zoo card "
          f"(clean n = {cards['odgq']['eval'][0]['clean_n']}, PGD-20 n = {cards['odgq']['eval'][0]['robust_n']})")
    print(f"\n| method | model | mean epoch time (s) | x natural | clean | PGD-20 | PGD-20 per epoch (n = {per_epoch_n}) |")
    print("|---|---|---|---|---|---|---|")
    out = {}
    for m, c in cards.items():
        hist = c["history"]
        t = statistics.mean(h["epoch_time_s"] for h in hist)
        ratio = ratios.get(m, t / statistics.mean(h["epoch_time_s"] for h in cards["natural"]["history"]))
        ev = c["eval"][0]
        print(f"| {m} | {c['name']} | {t:.1f} | {ratio:.2f} | {pct(ev['clean_accuracy'])} | {pct(ev['robust_accuracy'])} | "
              + ", ".join(pct(h["robust_accuracy"]) for h in hist) + " |")
        out[m] = {"epoch_time_s": t, "ratio_to_natural": ratio, "eval": ev, "history": hist}
    out["standard"] = standard_d(cards)
    return out


def standard_d(cards: dict) -> dict:
    """The same models under the standard protocol, from their cards' records (same first
    500 test images), each paired against natural training at its precision: the claim is
    robust accuracy far above natural training (difference > 0)."""
    from rqlab.report.claims import verdict
    from rqlab.stats import paired_difference

    recs = {m: zoo.standard_record(c["name"]) for m, c in cards.items() if c.get("standard")}
    if "natural" not in recs:
        return {}
    print("\n### (d) The same models under the standard protocol (their cards), paired against natural "
          "training at 4 bits on the same images")
    print("\n| method | standard protocol [95% CI] | n | strongest | minus natural, paired [95% CI] | verdict | flags |")
    print("|---|---|---|---|---|---|---|")
    out = {}
    for m, r in recs.items():
        diff, ci95 = paired_difference(r.robust_scores(), recs["natural"].robust_scores())
        v = verdict(ci95) if m == "odgq" else ""  # the claim under test; -small has no binary natural control
        out[m] = {"robust": r["robust_accuracy"], "ci95": r["robust_ci95"], "n": r["n"], "strongest": r["strongest"],
                  "minus_natural": diff, "minus_natural_ci95": list(ci95), "verdict": v,
                  "unreliable": list(r.unreliable)}
        print(f"| {m} | {pct(r['robust_accuracy'])} [{pct(r['robust_ci95'][0])}, {pct(r['robust_ci95'][1])}] | "
              f"{r['n']} | {r['strongest']} | "
              + ("" if m == "natural" else "- (natural is 4-bit)" if m == "odgq-binary" else
                 f"{100 * diff:+.1f} [{100 * ci95[0]:+.1f}, {100 * ci95[1]:+.1f}]")
              + f" | {v} | {'flagged' if r.unreliable else '-'} |")
    return out


def section_t(test, n: int) -> dict:
    """Behind (b): how well PGD-20 transfers between precisions (Double-Win Quant's premise),
    for the PGD-7 models trained at 4 and 8 bits, attack and inference bits 3..8."""
    from rqlab.analysis.transfer import transfer_matrix

    x, y = test.x[:n].float() / 255, test.y[:n]
    bits = [3, 4, 5, 6, 7, 8]
    out = {}
    for name in full_or_small("fmnist-q4-pgd7", "fmnist-q8-pgd7"):
        tm = transfer_matrix(zoo.load(name), x, y, bits, bits, PGD20)
        m = tm["matrix"]
        diag = [m[i][i] for i in range(len(bits))]
        off = [m[i][j] for i in range(len(bits)) for j in range(len(bits)) if i != j]
        print(f"\n### (b) Transfer matrix of {name}, PGD-20 eps 0.1, n = {n}: rows = attack bits, "
              "columns = inference bits")
        print("\n| attack \\ inference | " + " | ".join(map(str, bits)) + " |")
        print("|---|" + "---|" * len(bits))
        for b, row in zip(bits, m):
            print(f"| {b} | " + " | ".join(pct(v) for v in row) + " |")
        print(f"\nmean diagonal {pct(statistics.mean(diag))}, mean off-diagonal {pct(statistics.mean(off))}")
        out[name] = {**tm, "mean_diagonal": statistics.mean(diag), "mean_off_diagonal": statistics.mean(off)}
    out["n"] = n
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", default="aAbBcdt",
                   help="any of a, A (a under the standard protocol), b, B (b under the standard protocol), c, d, "
                        "t (default: all)")
    p.add_argument("--n", type=int, default=500, help="test examples (default 500)")
    p.add_argument("--aa-n", type=int, default=100, help="test examples for AutoAttack rand (default 100)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    test = data.load("fashion-mnist", "test", n=max(args.n, args.aa_n), seed=0)
    for s in args.section:
        t0 = time.perf_counter()
        result = {"a": lambda: section_a(test, args.n), "b": lambda: section_b(test, args.n, args.aa_n),
                  "B": lambda: section_b_standard(test, args.n), "A": lambda: section_a_standard(test, args.n),
                  "c": lambda: section_c(test, args.n), "d": section_d, "t": lambda: section_t(test, args.n)}[s]()
        result["seconds"] = time.perf_counter() - t0
        result["torch"] = torch.__version__
        checkpoint.save_json(OUT / f"{ {'A': 'a_standard', 'B': 'b_standard'}.get(s, s)}.json", result)
        print(f"\n(section {s}: {result['seconds'] / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
