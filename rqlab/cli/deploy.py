"""`rqlab deploy`: the robustness of a model's int8 deployment on ONNX Runtime, beside its
fake-quant figure, as one record.

    rqlab deploy --model fmnist-q8-pgd7-small --engine onnxruntime --json rec.json
    rqlab deploy --model runs/x --activations int8 --quantize-edges --square-queries 5000 --onnx int8.onnx
"""
from __future__ import annotations

from ..validate import RqlabError

ENGINES = ("onnxruntime",)


def add_cli(subparsers) -> None:
    """Register `rqlab deploy` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "deploy", help="robustness of the int8 ONNX Runtime deployment of a model, beside its fake-quant figure",
        description="Export the model to ONNX, quantize it statically to int8 with ONNX Runtime (QDQ, per-channel "
                    "int8 weights, calibrated activations) and evaluate the engine: clean accuracy, agreement with "
                    "the fake-quant twin (8 bits) and FP, transfer attacks from both and Square on the engine. The "
                    "engine has no gradient: its robust accuracy is an upper bound. Needs rqlab[deploy].")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="a zoo model name (rqlab zoo list) or a checkpoint path / run directory")
    p.add_argument("--engine", default="onnxruntime", help="the inference engine: onnxruntime (default; the only one)")
    p.add_argument("--activations", default="uint8", help="activation type: uint8 (default) | int8")
    p.add_argument("--calibration", default="minmax", help="activation ranges: minmax (default) | entropy | percentile")
    p.add_argument("--calib-n", type=int, default=1024, help="calibration images from the training set (default 1024)")
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration subset (default 0)")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per channel)")
    p.add_argument("--quantize-edges", action="store_true",
                   help="also quantize the first conv and last linear layer, which the fake-quant model keeps FP")
    p.add_argument("--data", default="fashion-mnist", help="dataset name (default fashion-mnist)")
    p.add_argument("--data-root", default=None, help="dataset directory (default: rqlab's data root)")
    p.add_argument("--attack", default="pgd", help="white-box attack crafted on the twin and on FP: pgd (default) | "
                                                   "fgsm | cw")
    p.add_argument("--norm", default="linf", help="linf | l2 (default linf)")
    p.add_argument("--eps", type=float, default=0.1, help="radius in [0, 1] pixel units (default 0.1)")
    p.add_argument("--steps", type=int, default=20, help="attack steps (default 20)")
    p.add_argument("--square-queries", type=int, default=1000, help="Square's queries per example (default 1000)")
    p.add_argument("--n", type=int, default=1000, help="test examples (default 1000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="device of the transfer sources: auto | cpu | cuda (the engine "
                                                    "runs on the CPU)")
    p.add_argument("--onnx", default=None, metavar="PATH", help="also write the int8 ONNX model here (atomically)")
    p.add_argument("--json", default=None, help="write the record here (atomically)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_cli)


def run_cli(args) -> int:
    """`rqlab deploy`: load, build the engine, evaluate, print the table, write the JSON. Returns 0."""
    from .. import checkpoint, data
    from ..attacks import ThreatModel
    from ..training import resolve_device
    from ..validate import check_choice
    from ..zoo import load, weights_file
    from .eval import write_record

    check_choice(args.engine, "engine", ENGINES)
    threat = ThreatModel(args.attack, norm=args.norm, eps=args.eps, steps=args.steps, seed=args.seed)
    from .. import deploy
    from ..extras import require

    try:  # a missing extra is a usage error here: name it, no traceback
        require("onnx", "deploy"), require("onnxruntime", "deploy")
    except ImportError as e:
        raise RqlabError(str(e)) from None
    config = deploy.Int8Config(activations=args.activations, per_channel=not args.per_tensor,
                               calibration=args.calibration, calib_n=args.calib_n, calib_seed=args.calib_seed,
                               quantize_edges=args.quantize_edges)
    if args.square_queries < 1:
        raise RqlabError(f"--square-queries={args.square_queries} must be at least 1")
    model = load(args.model, device=resolve_device(args.device))
    calib_x, source = deploy.calibration_set(args.data, args.calib_n, args.calib_seed, root=args.data_root)
    engine = deploy.int8_engine(model, calib_x, config, calibration_source=source)
    if args.onnx:
        checkpoint.atomic_write_bytes(args.onnx, engine.onnx_model)
    test_set = data.load(args.data, split="test", n=args.n, seed=args.seed, root=args.data_root)
    record = deploy.evaluate_engine(model, engine, test_set, threat, square_queries=args.square_queries,
                                    batch_size=args.batch_size, seed=args.seed, model_id=str(args.model),
                                    progress=not args.no_progress)
    record = record.with_extra(checkpoint_sha256=checkpoint.sha256(weights_file(args.model)), data=args.data)
    print(deploy.format_engine_record(record))
    if args.onnx:
        print(f"int8 ONNX model: {args.onnx}")
    if args.json:
        write_record(args.json, record)
        print(f"record: {args.json}")
    return 0
