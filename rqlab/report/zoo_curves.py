"""The zoo's training curves in one figure: held-out clean and PGD-20 accuracy per epoch of
every built full-budget model (the curves `zoo.full_budget_problems` checks for a plateau)
and, dashed, of the models still training (their run folder's history.json).

    rqlab zoo curves --out docs/zoo_curves.png        # the figure docs/findings.md shows
    >>> curves = zoo_curves(runs="runs/zoo")          # {name: {"history", "status", "plateau", ...}}
    >>> fig = curves_figure(curves)

Held-out: the first `eval_n` images of the seeded test subset for clean accuracy, the first
`eval_pgd` of them for PGD-20 (the recipe's `rqlab train --eval-n 2000 --eval-pgd 1000`).
Natural and DQ models are judged on the clean curve (their PGD-20 accuracy is about 0 at
eps 0.1), adversarial ones on the PGD-20 curve, as `zoo.plateau` does.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import zoo
from ..extras import require
from ..machine import devices_line
from ..validate import RqlabError


def full_budget_names() -> list[str]:
    """The CPU zoo's full-budget recipes (issue 14): no -small suffix, no GPU recipe."""
    return [n for n in zoo.names() if not n.endswith("-small") and not zoo.RECIPES[n].gpu]


def _judged_key(name: str) -> str:
    return "clean_accuracy" if zoo.recipe(name).spec.defense in ("natural", "dq") else "robust_accuracy"


def zoo_curves(names=None, runs: str | Path | None = None) -> dict[str, dict]:
    """The curves to draw, in zoo order: each built model's card history ("built"), and
    where `runs` is given, the history of each model of `names` not built yet but training
    in runs/NAME ("training"). names: zoo names (default: every full-budget recipe).
    Each entry: history, status, epochs (planned), device, plateau (`zoo.plateau` on the
    judged key, with FULL_PLATEAU_TOL)."""
    names = full_budget_names() if names is None else list(names)
    unknown = [n for n in names if n not in zoo.RECIPES]
    if unknown:
        raise RqlabError(f"names: {unknown} are not zoo recipes (see `rqlab zoo list`)")
    built = set(zoo.names(trained_only=True))
    out = {}
    for name in names:
        planned = zoo.recipe(name).spec.train.epochs
        if name in built:
            c = zoo.card(name)
            history, status, device = c.get("history") or [], "built", c.get("device")
        elif runs is not None and (Path(runs) / name / "history.json").is_file():
            path = Path(runs) / name / "history.json"
            try:
                history = json.loads(path.read_text())
            except ValueError as e:
                raise RqlabError(f"{path}: not a training history ({e})") from e
            status, device = "training", None
        else:
            continue
        key = _judged_key(name)
        rows = [r for r in history if r.get(key) is not None]
        if not rows:
            continue
        out[name] = {"history": rows, "status": status, "epochs": planned, "device": device,
                     "plateau": zoo.plateau(rows, tol=zoo.FULL_PLATEAU_TOL, key=key)}
    return out


def _label(name: str, c: dict) -> str:
    p = c["plateau"]
    if c["status"] == "training":
        return f"{name} (training: {len(c['history'])}/{c['epochs']} epochs)"
    if p["gain"] is None:
        return f"{name} (too short to judge)"
    return f"{name} ({100 * p['gain']:+.1f} pts in the last {p['window']} epochs)"


def curves_figure(curves: dict):
    """Three panels: held-out clean accuracy per epoch of the natural and DQ models (the
    curve they are judged by), then held-out clean and PGD-20 accuracy of the adversarially
    trained ones (judged by PGD-20); one line per model, dashed while training. Each
    legend gives a built model's gain over its last epochs on its judged curve (a plateau:
    at most zoo.FULL_PLATEAU_TOL). The machines the curves were trained on are named under
    the figure."""
    if not curves:
        raise RqlabError("curves: no model to draw (none built and none training; see `rqlab zoo list`)")
    plt = require("matplotlib.pyplot", "notebooks")
    keys = [c["plateau"]["key"] for c in curves.values()]
    rows = max(keys.count("clean_accuracy"), keys.count("robust_accuracy"))
    legend_h = 0.3 + 0.19 * rows                      # inches under the panels for the legends
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4 + legend_h))
    bottom = legend_h / (4.4 + legend_h)
    count = {"clean_accuracy": 0, "robust_accuracy": 0}
    for name, c in curves.items():
        key = c["plateau"]["key"]
        i = count[key]
        count[key] += 1
        style = dict(color=f"C{i % 10}", marker="o" if i < 10 else "s", markersize=3,
                     linestyle="--" if c["status"] == "training" else "-")
        epochs = [r["epoch"] for r in c["history"]]
        clean_axis = axes[0] if key == "clean_accuracy" else axes[1]
        clean_axis.plot(epochs, [100 * r["clean_accuracy"] for r in c["history"]], label=_label(name, c), **style)
        if key == "robust_accuracy":
            axes[2].plot(epochs, [100 * r["robust_accuracy"] for r in c["history"]], **style)
    axes[0].set(title="natural / DQ training: held-out clean accuracy")
    axes[1].set(title="adversarial training: held-out clean accuracy")
    axes[2].set(title="adversarial training: held-out PGD-20 accuracy (eps 0.1)")
    for ax in axes:
        ax.set(xlabel="epoch", ylabel="accuracy (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax, x in ((axes[0], 0.17), (axes[1], 0.67)):
        if ax.get_legend_handles_labels()[0]:
            fig.legend(*ax.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(x, bottom),
                       fontsize=8, frameon=False)
    where = devices_line(c["device"] for c in curves.values())
    note = "; ".join(s for s in (f"trained on {where}" if where else "",
                                 "dashed: still training" if any(c["status"] == "training" for c in curves.values())
                                 else "") if s)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    if note:
        fig.text(0.995, 0.005, note, ha="right", va="bottom", fontsize=7, color="0.35")
    return fig


def write_figure(curves: dict, out: str | Path) -> Path:
    """Draw `curves` and save the figure to `out` (PNG, SVG or PDF by its suffix), atomically."""
    import io

    from ..checkpoint import atomic_write_bytes

    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in ("png", "svg", "pdf"):
        raise RqlabError(f"out={str(out)!r}: the figure's suffix must be .png, .svg or .pdf")
    fig = curves_figure(curves)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    require("matplotlib.pyplot", "notebooks").close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out
