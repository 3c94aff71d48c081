"""The experiment layer: one validated, serialisable run specification and one call that
trains it.

    >>> spec = RunSpec(model="smallcnn", data="fashion-mnist", policy="4", defense="pgd-at",
    ...                train=TrainConfig(epochs=4, n_train=6000), eval_pgd=200)
    >>> model, history = rqlab.train(spec, out="runs/q4-pgd7")   # resumable, checkpoint per epoch
    >>> spec.command("runs/q4-pgd7")                              # the same run from the shell
    'rqlab train --bits 4 --defense pgd-at --epochs 4 --n-train 6000 --eval-pgd 200 --out runs/q4-pgd7'

A RunSpec holds everything that defines the trained weights: the model, the dataset (and
training subset), the precision policy, the defense with its settings, the training
configuration (seed included) and the per-epoch robust evaluation. `train` owns what
used to be spread over the command line and the zoo: the data subsets, the model (with
switchable batch norm exactly when the defense trains over a precision set), the
defense's hooks, the step-size rule (`defenses.pgd_train_step`), the per-epoch PGD-20
and the checkpoints. `rqlab train`, the zoo's recipes and the studies all go through it.

History rows (one per epoch) name accuracies as the evaluation record does:
`clean_accuracy` (test subset) and `robust_accuracy` (PGD-20 on the first `eval_pgd`
test examples, when asked for), beside train_loss, train_acc, lr and times.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from . import checkpoint, data, defenses, distributed, models, quant
from .training import TrainConfig, fit, resolve_device, seed_everything
from .validate import RqlabError, check_float, check_int

SPEC_FORMAT = "rqlab-runspec"
SPEC_VERSION = 1
DEFAULT_TRAIN = TrainConfig(epochs=2)  # smallcnn on Fashion-MNIST: ~90% clean after 2 epochs
PGD_EVAL_STEPS = 20                    # the per-epoch robust figure is PGD-20 (METHODS section 6)
TEST_BATCH = 500

# Defense settings and their `rqlab train` flags.
_FLAGS = {"steps": "--attack-steps", "step_size": "--attack-step-size", "beta": "--beta", "lam": "--lam",
          "alpha": "--alpha"}


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one training run; validated at construction.

    model: a registered model name (`rqlab.models.names()`).
    data: a dataset name (`rqlab.data.NAMES`); train.n_train / train.eval_n pick the
        fixed seed-0 subsets of its training and test splits.
    policy: the training precision: a Policy, its dict, or a spelling ("fp", "4",
        "w32a4", "4-8", "4,6,8"; a random set is seeded with the run's seed).
    defense: a registered defense (`rqlab.defenses.names()`); defense_config: its
        settings over the defaults (`defenses.resolve_params`); stored resolved.
    eps: the linf radius of the run: adversarial training's and the per-epoch PGD-20's
        (default: the dataset's, METHODS section 0: 0.1 on (Fashion-)MNIST, else 8/255).
    train: the TrainConfig (optimiser, schedule, epochs, seed, subsets, device).
    eval_pgd: PGD-20 robust accuracy after every epoch on this many test examples (0: off).
    """

    model: str = "smallcnn"
    data: str = "fashion-mnist"
    policy: object = "fp"
    defense: str = "natural"
    defense_config: dict = field(default_factory=dict)
    eps: float | None = None
    train: TrainConfig = DEFAULT_TRAIN
    eval_pgd: int = 0

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("model", models.canonical_name(self.model))
        info = data.dataset_info(self.data)
        set_("data", info.name)
        train = self.train
        if isinstance(train, dict):
            train = TrainConfig.from_dict(train)
        if not isinstance(train, TrainConfig):
            raise RqlabError(f"train={train!r} must be a TrainConfig or its dict")
        set_("train", train)
        set_("policy", as_policy(self.policy, train.seed))
        defense = defenses.canonical(self.defense)
        set_("defense", defense)
        if not isinstance(self.defense_config, dict):
            raise RqlabError(f"defense_config={self.defense_config!r} must be a dict of the defense's settings")
        config = defenses.resolve_params(defense, self.defense_config)
        eps = _resolve_eps(self.eps, self.defense_config.get("eps"), info.name)
        set_("eps", eps)
        if "eps" in config:
            config["eps"] = eps
        set_("defense_config", config)
        if defenses.needs_bits_set(defense) and not isinstance(self.policy, quant.RandomPrecision):
            raise RqlabError(f"defense={defense!r} trains over a precision set: give policy as a set such as "
                             f"'4-8' or '4,6,8' (got {self.policy})")
        set_("eval_pgd", check_int(self.eval_pgd, "eval_pgd", 0, info.sizes["test"]))

    # -- derived --------------------------------------------------------------------------

    @property
    def seed(self) -> int:
        """The run's seed: initial weights, data order, the defense's randomness."""
        return self.train.seed

    @property
    def sbn_bits(self) -> tuple[int, ...] | None:
        """Switchable batch norm's precisions: the policy's set when the defense trains over it."""
        return self.policy.support() if defenses.needs_bits_set(self.defense) else None

    def fresh_policy(self):
        """A new copy of the policy (a random one with its generator at the start)."""
        return quant.policy_from_dict(self.policy.to_dict())

    def replace(self, **changes) -> "RunSpec":
        """A copy with `changes`; train may be given as {field: value} changes to the TrainConfig."""
        if isinstance(changes.get("train"), dict):
            changes["train"] = replace(self.train, **changes["train"])
        return replace(self, **changes)

    # -- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "model": self.model, "data": self.data,
                "policy": self.policy.to_dict(), "defense": self.defense, "defense_config": dict(self.defense_config),
                "eps": self.eps, "train": self.train.to_dict(), "eval_pgd": self.eval_pgd}

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        if not isinstance(d, dict):
            raise RqlabError(f"a run spec must be a dict, got {type(d).__name__}")
        d = dict(d)
        fmt, version = d.pop("format", SPEC_FORMAT), d.pop("version", SPEC_VERSION)
        if fmt != SPEC_FORMAT or version != SPEC_VERSION:
            raise RqlabError(f"run spec format={fmt!r} version={version!r}: this rqlab reads "
                             f"{SPEC_FORMAT!r} version {SPEC_VERSION}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RqlabError(f"run spec has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise RqlabError(f"run spec is not valid JSON: {e}") from None

    # -- the command line -------------------------------------------------------------------

    def to_argv(self) -> list[str]:
        """The `rqlab train` arguments that reproduce this spec (settings at their defaults
        are left out); `rqlab.cli.train.spec_from_args` reads them back to an equal spec."""
        t, d = self.train, DEFAULT_TRAIN
        argv = []
        for flag, value, default in (("--model", self.model, "smallcnn"), ("--data", self.data, "fashion-mnist"),
                                     ("--bits", policy_spelling(self.policy, self.seed), "fp"),
                                     ("--defense", self.defense, "natural")):
            if value != default:
                argv += [flag, value]
        if self.eps != data.default_eps(self.data):
            argv += ["--eps", repr(self.eps)]
        defaults = defenses.resolve_params(self.defense)
        for key, value in self.defense_config.items():
            if key != "eps" and value != defaults[key]:  # a setting without a flag of its own: --set
                argv += [_FLAGS[key], repr(value)] if key in _FLAGS else ["--set", f"{key}={json.dumps(value)}"]
        for name, flag in (("epochs", "--epochs"), ("batch_size", "--batch-size"), ("lr", "--lr"),
                           ("momentum", "--momentum"), ("weight_decay", "--weight-decay"),
                           ("schedule", "--schedule"), ("seed", "--seed"), ("n_train", "--n-train"),
                           ("eval_n", "--eval-n"), ("device", "--device")):
            if getattr(t, name) != getattr(d, name):
                argv += [flag, str(getattr(t, name))]
        argv += ["--augment"] if t.augment else []
        argv += ["--amp"] if t.amp else []
        argv += ["--channels-last"] if t.channels_last else []
        argv += ["--compile"] if t.compile else []
        argv += ["--eval-pgd", str(self.eval_pgd)] if self.eval_pgd else []
        if t.log_every != d.log_every:
            raise RqlabError(f"train.log_every={t.log_every} has no `rqlab train` flag")
        return argv

    def command(self, out=None) -> str:
        """The shell command that trains this spec (for display: recipes, cards, logs)."""
        argv = ["rqlab", "train", *self.to_argv()] + (["--out", str(out)] if out is not None else [])
        return " ".join(shlex.quote(a) for a in argv)


def as_policy(policy, seed: int = 0):
    """A Policy from a Policy, its dict, or a spelling (a random set seeded with `seed`)."""
    if isinstance(policy, (quant.Fixed, quant.PerLayer, quant.RandomPrecision)):
        return policy
    if isinstance(policy, dict):
        return quant.policy_from_dict(policy)
    if isinstance(policy, (str, int)) and not isinstance(policy, bool):
        return quant.parse_policy(str(policy), seed=seed)
    raise RqlabError(f"policy={policy!r} must be a precision policy, its dict, or a spelling such as fp, 4, "
                     "w32a4, 4-8 or 4,6,8")


def _resolve_eps(eps, config_eps, data_name: str) -> float:
    if eps is not None and config_eps is not None and float(eps) != float(config_eps):
        raise RqlabError(f"eps={eps} and defense_config['eps']={config_eps} disagree: give eps once")
    value = eps if eps is not None else config_eps
    return data.default_eps(data_name) if value is None else check_float(value, "eps", 0.0, 1.0)


def policy_spelling(policy, seed: int = 0) -> str:
    """The `--bits` spelling of a policy ("fp", "4", "w32a4", "4,5,6"); a random set must be
    seeded with the run's `seed` and a per-layer policy has none (RqlabError)."""
    if isinstance(policy, quant.Fixed):
        return str(policy)
    if isinstance(policy, quant.RandomPrecision):
        if policy.seed != seed:
            raise RqlabError(f"a random policy seeded {policy.seed} has no --bits spelling in a run seeded {seed}")
        c = policy.choices
        return f"{c[0]}-{c[-1]}" if c == tuple(range(c[0], c[-1] + 1)) else ",".join(map(str, c))
    raise RqlabError(f"policy {policy} has no --bits spelling: per-layer policies are set in Python")


# ---- training ----------------------------------------------------------------------------

def build_model(spec: RunSpec, info=None):
    """The untrained model of `spec` (seeded with the run's seed), at its training policy.

    info: the dataset's shape/normalisation (`data.dataset_info(spec.data)` by default,
    or a Dataset, whose mean/std are used).
    """
    info = info if info is not None else data.dataset_info(spec.data)
    seed_everything(spec.seed)  # the initial weights depend on the seed alone
    model = models.create(spec.model, input_shape=tuple(info.input_shape), mean=tuple(info.mean),
                          std=tuple(info.std), num_classes=_num_classes(info), sbn_bits=spec.sbn_bits)
    return quant.apply(model, spec.fresh_policy())


def _num_classes(info) -> int:
    return info.num_classes if hasattr(info, "num_classes") else len(info.classes)


def build_hooks(spec: RunSpec):
    """The defense's training hooks, with the spec's settings and seed."""
    return defenses.build(spec.defense, bits=spec.policy.support() if spec.sbn_bits else None, seed=spec.seed,
                          **spec.defense_config)


def robust_metric(spec: RunSpec, test_set, distributed: bool = False):
    """fn(model) -> PGD-20 robust accuracy at spec.eps on the first spec.eval_pgd test examples
    (sharded over the ranks of the process group when `distributed`)."""
    from .attacks import ThreatModel
    from .evaluation import evaluate

    threat = ThreatModel("pgd", eps=spec.eps, steps=PGD_EVAL_STEPS)
    n = min(spec.eval_pgd, len(test_set))
    return lambda model: evaluate(model, test_set, threat, n=n, progress=False,
                                  distributed=distributed)["robust_accuracy"]


def train(spec: RunSpec, out=None, *, train_set=None, test_set=None, data_root=None, resume: bool = True,
          progress: bool = True, log=print, epoch_metrics: dict | None = None):
    """Train `spec`; return (model in eval mode at its training policy, history).

    out: a directory for checkpoint.pt (every epoch; resumed when it exists and resume
        is True), history.json and spec.json; None trains in memory only.
    train_set, test_set: Datasets to use instead of loading spec.data's seed-0 subsets
        (n_train / eval_n examples), e.g. synthetic data in tests; they must be of spec.data.
    epoch_metrics: extra {key: fn(model) -> float} after every epoch (see `training.fit`).

    Under torchrun (`rqlab train --nproc N`) every rank calls this: it joins the process
    group (`distributed.init`) and trains its shard of every global batch of
    train.batch_size examples in DistributedDataParallel; rank 0 writes `out` and logs.
    """
    if not isinstance(spec, RunSpec):
        raise RqlabError(f"spec must be a RunSpec, got {type(spec).__name__}")
    cfg = spec.train
    group = distributed.init(cfg.device)
    device = resolve_device(cfg.device)
    if group is not None and not group.is_main:
        log, progress = None, False
    hooks = build_hooks(spec)
    # Subsets are fixed (seed 0), whatever the run's seed: runs differ in weights and order only.
    if train_set is None:
        train_set = data.load(spec.data, split="train", n=cfg.n_train, seed=0, root=data_root)
    if test_set is None:
        test_set = data.load(spec.data, split="test", n=cfg.eval_n, seed=0, root=data_root)
    for which, ds in (("train_set", train_set), ("test_set", test_set)):
        if ds.name != spec.data:
            raise RqlabError(f"{which} is {ds.name!r} but the spec trains on {spec.data!r}")
    train_loader = data.Loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, augment=cfg.augment,
                               device=device if group is None else "cpu")
    if group is not None:  # each rank takes its part of every global batch (fit moves it)
        train_loader = distributed.ShardedLoader(train_loader, group.rank, group.world)
    test_loader = data.Loader(test_set, TEST_BATCH, device=device)
    model = build_model(spec, train_set)
    metrics = {"robust_accuracy": robust_metric(spec, test_set, group is not None)} if spec.eval_pgd else {}
    metrics.update(epoch_metrics or {})
    if out is not None and (group is None or group.is_main):
        checkpoint.save_json(Path(out) / "spec.json", spec.to_dict())
    history = fit(model, train_loader, cfg, hooks=hooks, out=out, test_loader=test_loader, resume=resume,
                  progress=progress, log=log, epoch_metrics=metrics, meta={"spec": spec.to_dict()}, group=group)
    return model.eval(), history


def restore(path, device="cpu", eval: bool = True):
    """Rebuild the model stored in a checkpoint file: config, weights (strict) and precision
    policy. (Users load models with `rqlab.load`, which takes a zoo name too.)

    The model is returned on `device`, in eval mode unless `eval=False`. A random
    precision policy is restored with its generator state as saved.
    """
    ckpt = checkpoint.load(path)
    for key in ("model", "state_dict"):
        if ckpt.get(key) is None:
            raise RqlabError(f"checkpoint {path} has no {key!r} entry: it holds no model to rebuild")
    model = models.from_config(ckpt["model"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise RqlabError(f"checkpoint {path}: weights do not fit the stored model config: "
                         f"{str(e).splitlines()[0][:300]}") from e
    policy = quant.policy_from_dict(ckpt.get("policy"))
    if ckpt.get("policy_state") is not None and hasattr(policy, "set_state"):
        policy.set_state(ckpt["policy_state"])
    quant.apply(model, policy)
    model.to(device)
    return model.train(not eval)


__all__ = ["RunSpec", "TrainConfig", "DEFAULT_TRAIN", "train", "build_model", "build_hooks", "robust_metric",
           "policy_spelling", "as_policy", "restore"]
