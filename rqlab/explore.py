"""Interactive explorers for the notebooks (ipywidgets): pick a model, a bit-width and an
eps, and read the clean and robust accuracy on a small batch, recomputed on the fly.

    >>> probe = robustness_probe({"q4": model}, x[:64], y[:64], ThreatModel("pgd", eps=0.1, steps=10))
    >>> ex = Explorer(probe, models=["q4"], bits=[2, 4, 8, 32], eps=(0.0, 0.3, 0.1))
    >>> ex                                   # in a notebook: the widgets
    >>> ex.bits.value = 4                    # recomputes; ex.result.value holds the text:
    'robust accuracy at b=4, eps=0.100: 63.0% (clean 80.0%; q4, 64 examples, pgd-10 (bf16, active set))'

The probe's attack runs fast by default (active set, bf16 where the hardware has it;
`robustness_probe(fast=False)` for the full fp32 attack): the text says which.

Widgets (stable descriptions, for people and browser tests): Dropdown "model",
SelectionSlider "bits", FloatSlider "eps" (both continuous_update=False: one
computation per release), an HTML "result" with the text above (CSS class
`rqlab-explorer-result`), and an Output with a small figure: robust and clean accuracy
against eps for the current model and bits, from every point computed so far.

A probe is any callable (model name, bits, eps) -> {"clean_accuracy": float,
"robust_accuracy": float, "n": int, ...} (optionally "robust_worst_accuracy", "passes"); results are cached per setting. A probe that raises RqlabError (e.g.
bits the model has no ranges for) shows the message instead of a number.
"""
from __future__ import annotations

from typing import Callable

from .extras import require
from .validate import FP_BITS, RqlabError, check_float

RESULT_CLASS = "rqlab-explorer-result"


def bits_label(b) -> str:
    """32 -> 'fp', other ints as they are, strings (e.g. a random set '4-8') unchanged."""
    return "fp" if b == FP_BITS else str(b)


def result_text(name: str, bits, eps: float, r: dict) -> str:
    """'robust accuracy at b=4, eps=0.100: 63.0% (clean 80.0%; NAME, 64 examples, pgd-10)'."""
    extra = f", {r['attack']}" if r.get("attack") else ""
    how = r.get("attack_settings") or {}
    fast = [w for w, on in (("bf16", how.get("arithmetic") == "bf16"), ("active set", how.get("active_set"))) if on]
    extra += f" ({', '.join(fast)})" if fast and extra else ""
    worst = (f", worst case {100 * r['robust_worst_accuracy']:.1f}%"
             if r.get("robust_worst_accuracy") is not None and r.get("passes", 1) > 1 else "")
    return (f"robust accuracy at b={bits_label(bits)}, eps={eps:.3f}: {100 * r['robust_accuracy']:.1f}% "
            f"(clean {100 * r['clean_accuracy']:.1f}%{worst}; {name}, {r['n']} examples{extra})")


def robustness_probe(models: dict, x, y, threat, policy: Callable | None = None, passes: int = 1,
                     fast: bool = True) -> Callable:
    """A probe: clean and robust accuracy of models[name] on (x, y) under `threat` at
    radius eps, with the defender's precision `policy(name, bits)` (default Fixed(bits);
    return a RandomPrecision to score random inference with `passes` passes).

    fast (default True): the slider's attack runs with the active set and "auto"
    arithmetic (bf16 where the hardware has it; docs/performance.md: 1.5-2x, robust
    accuracy within the interval of the fp32 full attack on every zoo model), and the
    result says so ("attack_settings"). Headline numbers (cards, report, `rqlab eval`)
    keep fp32 and the full attack; fast=False gives those here too."""
    import contextlib

    from . import attacks, quant
    from .evaluation import evaluate

    policy = policy or (lambda name, bits: quant.Fixed(bits))
    if not isinstance(fast, bool):
        raise RqlabError(f"fast={fast!r}: must be True or False")

    def probe(name, bits, eps):
        p = policy(name, bits)
        k = passes if isinstance(p, quant.RandomPrecision) else 1
        t = threat.replace(attack="fgsm", eps=0.0, steps=1) if eps == 0 else threat.replace(eps=float(eps))
        with (attacks.arithmetic("auto") if fast else contextlib.nullcontext()), attacks.active_set(fast):
            rec = evaluate(models[name], (x, y), t, policy=p, passes=k, progress=False)
        return {"clean_accuracy": rec["clean_accuracy"], "robust_accuracy": rec["robust_accuracy"],
                "robust_worst_accuracy": rec["robust_worst_accuracy"], "passes": k, "n": rec["n"],
                "attack": f"{threat.attack}-{threat.steps}", "policy": str(p),
                "attack_settings": rec["attack_settings"]}

    return probe


class Explorer:
    """The widgets of the module docstring around a probe. Display it (last expression of
    a cell) or `explorer.widget`. `refresh()` recomputes for the current values.

    models: the menu's entries (the probe's names); bits: the slider's values (ints, 32
    shown as "fp", or strings such as "rpi"), starting at `start_bits` (default: the
    middle one); eps: (min, max, start) of the eps slider, in steps of `eps_step`.
    """

    def __init__(self, probe: Callable, models, bits, eps=(0.0, 0.3, 0.1), eps_step: float = 0.01,
                 title: str = "", plot: bool = True, start_bits=None):
        W = require("ipywidgets", "notebooks")

        models = list(models)
        bits = list(bits)
        if not models:
            raise RqlabError("the explorer needs at least one model")
        if not bits:
            raise RqlabError("the explorer needs at least one bit-width")
        lo, hi, value = (check_float(v, f"eps[{i}]", 0.0, 1.0) for i, v in enumerate(eps))
        if not lo <= value <= hi or lo >= hi:
            raise RqlabError(f"eps={eps!r} must be (min, max, value) with min <= value <= max and min < max")
        self.probe, self.plot, self.cache = probe, plot, {}
        self.model = W.Dropdown(options=models, value=models[0], description="model")
        if start_bits is not None and start_bits not in bits:
            raise RqlabError(f"start_bits={start_bits!r} is not one of bits={bits}")
        options = [(bits_label(b), b) for b in bits]
        self.bits = W.SelectionSlider(options=options, value=bits[len(bits) // 2] if start_bits is None else start_bits,
                                      description="bits", continuous_update=False)
        self.eps = W.FloatSlider(value=value, min=lo, max=hi, step=eps_step, description="eps",
                                 continuous_update=False, readout_format=".3f")
        self.result = W.HTML(value="", description="result")
        self.result.add_class(RESULT_CLASS)
        self.output = W.Output()
        header = [W.HTML(value=f"<b>{title}</b>")] if title else []
        self.widget = W.VBox(header + [W.HBox([self.model, self.bits, self.eps]), self.result, self.output])
        for w in (self.model, self.bits, self.eps):
            w.observe(lambda change: self.refresh(), names="value")
        self.refresh()

    def compute(self, name, bits, eps) -> dict:
        """The probe's result for one setting (cached)."""
        key = (name, bits, round(float(eps), 6))
        if key not in self.cache:
            self.cache[key] = self.probe(name, bits, float(eps))
        return self.cache[key]

    def refresh(self) -> str:
        name, bits, eps = self.model.value, self.bits.value, self.eps.value
        try:
            r = self.compute(name, bits, eps)
        except RqlabError as e:
            self.result.value = f"cannot compute at b={bits_label(bits)}, eps={eps:.3f} for {name}: {e}"
            return self.result.value
        self.result.value = result_text(name, bits, eps, r)
        if self.plot:
            self._draw(name, bits, eps)
        return self.result.value

    def _draw(self, name, bits, eps) -> None:
        """Replace the Output's content with a PNG of the figure. The PNG is set as widget
        state (no output capture, no IPython display hooks), so it works the same in a
        live notebook, under papermill and in tests."""
        import base64
        import io

        matplotlib = require("matplotlib", "notebooks")
        plt = require("matplotlib.pyplot", "notebooks")

        pts = sorted((k[2], v) for k, v in self.cache.items() if k[0] == name and k[1] == bits)
        with matplotlib.rc_context({"figure.dpi": 96}):
            fig, ax = plt.subplots(figsize=(4.2, 2.6))
            es = [e for e, _ in pts]
            ax.plot(es, [100 * v["robust_accuracy"] for _, v in pts], "o-", label="robust")
            ax.plot(es, [100 * v["clean_accuracy"] for _, v in pts], "s--", label="clean", alpha=0.6)
            cur = self.cache[(name, bits, round(float(eps), 6))]
            ax.plot([eps], [100 * cur["robust_accuracy"]], "o", ms=11, mfc="none", mec="C3")
            ax.set(xlabel="eps", ylabel="accuracy (%)", ylim=(-2, 102),
                   title=f"{name}, b={bits_label(bits)} (points computed so far)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            plt.close(fig)
        png = base64.b64encode(buf.getvalue()).decode()
        self.output.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": png, "text/plain": f"<figure: {name}, b={bits_label(bits)}>"}},)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


__all__ = ["Explorer", "robustness_probe", "result_text", "bits_label", "RESULT_CLASS"]
