"""The integer engine: ONNX Runtime static quantization (QDQ format) of an exported model,
and its InferenceSession wrapped as a model rqlab can score.

    >>> cfg = Int8Config(activations="uint8", calib_n=1024, calib_seed=0)
    >>> engine = int8_engine(model, calib_x, cfg)     # Engine: forward(x) -> logits, no gradient
    >>> engine(x).argmax(1)                           # x (B, C, H, W) in [0, 1] -> (B,)
    >>> engine.describe()                             # the settings, versions, calibration: recorded
    >>> fp = fp_engine(model)                         # the FP export on ONNX Runtime, no quantization

Quantization (`onnxruntime.quantization.quantize_static`): QDQ format (QuantizeLinear /
DequantizeLinear pairs around each quantized operator, which ONNX Runtime's graph
optimizer fuses into integer kernels such as QLinearConv and QGemm when the session is
built), int8 weights per output channel (symmetric), uint8 or int8 activations with one
range per tensor from a calibration pass over `calib_x` (min/max by default). By default
the layers the fake-quant model keeps FP (the first conv and the last linear) stay float
in the engine too, so that it is the twin of rqlab's Fixed(8); `quantize_edges=True`
quantizes every layer, as a plain deployment would.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..extras import require
from ..validate import RqlabError, check_choice, check_images, check_int
from .export import INPUT, OPSET, fp_node_prefixes, input_shape_of, to_onnx

ACTIVATIONS = ("uint8", "int8")
CALIBRATIONS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Int8Config:
    """Settings of the static int8 quantization, validated at construction and recorded.

    activations: "uint8" (asymmetric, ONNX Runtime's CPU default) | "int8" (symmetric).
    per_channel: int8 weights with one scale per output channel (else per tensor).
    calibration: how the activation ranges are set: "minmax" | "entropy" | "percentile".
    calib_n, calib_seed: the calibration images: `calib_n` of the training set, drawn
        with `calib_seed` (`data.load(dataset, "train", n=calib_n, seed=calib_seed)`).
    quantize_edges: also quantize the layers the fake-quant model keeps FP.
    opset: the ONNX opset of the export (>= 13: per-channel QDQ).
    """

    activations: str = "uint8"
    per_channel: bool = True
    calibration: str = "minmax"
    calib_n: int = 1024
    calib_seed: int = 0
    quantize_edges: bool = False
    opset: int = OPSET

    def __post_init__(self):
        check_choice(self.activations, "activations", ACTIVATIONS)
        check_choice(self.calibration, "calibration", CALIBRATIONS)
        check_int(self.calib_n, "calib_n", 1)
        check_int(self.calib_seed, "calib_seed", 0)
        check_int(self.opset, "opset", 13)
        for name in ("per_channel", "quantize_edges"):
            if not isinstance(getattr(self, name), bool):
                raise RqlabError(f"{name}={getattr(self, name)!r} must be True or False")

    def to_dict(self) -> dict:
        return asdict(self)


class Engine(nn.Module):
    """An ONNX Runtime InferenceSession (CPU) behind a model's interface: forward(x) ->
    logits, x (B, C, H, W) float in [0, 1] on any device, logits (B, classes) float32 on
    x's device. There is no gradient: a forward that would need one raises RqlabError
    (attack the engine with transfer attacks or Square). `queries` counts the images
    scored so far (Square's budget is checked against it).

    input_shape, num_classes: as rqlab models have them; kind: "int8" or "fp";
    settings: what `describe()` records.
    """

    def __init__(self, onnx_model: bytes, input_shape, kind: str, settings: dict | None = None,
                 name: str | None = None, threads: int | None = None):
        super().__init__()
        ort = require("onnxruntime", "deploy")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = check_int(threads or torch.get_num_threads(), "threads", 1)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])
        self.onnx_model = onnx_model
        self.input_shape = tuple(input_shape)
        self.kind = kind
        self.settings = dict(settings or {})
        self.name = name or f"onnxruntime-{kind}"
        self.queries = 0
        self.num_classes = int(self.session.run(None, {INPUT: torch.zeros(1, *self.input_shape).numpy()})[0].shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RqlabError(f"{self.name}: the ONNX Runtime engine has no gradient; attack it with a transfer "
                             "attack (crafted on its fake-quant twin or FP model) or with Square")
        check_images(x, self.input_shape, "x")
        logits = self.session.run(None, {INPUT: x.detach().float().cpu().contiguous().numpy()})[0]
        self.queries += len(x)
        return torch.from_numpy(logits).to(x.device)

    def describe(self) -> dict:
        """JSON: engine name, versions, provider, kind and the quantization settings."""
        ort = require("onnxruntime", "deploy")
        onnx = require("onnx", "deploy")
        return {"engine": "onnxruntime", "kind": self.kind, "onnxruntime_version": ort.__version__,
                "onnx_version": onnx.__version__, "providers": self.session.get_providers(),
                "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "onnx_bytes": len(self.onnx_model), **self.settings}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, input_shape={self.input_shape}, classes={self.num_classes}"


def fp_engine(model: nn.Module, input_shape=None, opset: int = OPSET, threads: int | None = None) -> Engine:
    """The FP export of `model` running on ONNX Runtime, no quantization (checks the export)."""
    shape = input_shape_of(model, input_shape)
    return Engine(to_onnx(model, shape, opset), shape, "fp", {"format": "fp32", "opset": opset},
                  name="onnxruntime-fp", threads=threads)


def int8_engine(model: nn.Module, calib_x: torch.Tensor, config: Int8Config | None = None, input_shape=None,
                threads: int | None = None, calibration_source: dict | None = None) -> Engine:
    """Export `model` at FP, quantize it statically to int8 (QDQ) on `calib_x` and load it.

    calib_x: float (N, C, H, W) in [0, 1] (or uint8), the calibration images (the first
    config.calib_n are used). calibration_source: where they came from (e.g. {"dataset",
    "split", "n", "seed"}), recorded in the settings."""
    config = config or Int8Config()
    if not isinstance(config, Int8Config):
        raise RqlabError(f"config must be an Int8Config, got {type(config).__name__}")
    shape = input_shape_of(model, input_shape)
    calib = calib_x.float().div(255) if calib_x.dtype == torch.uint8 else calib_x
    check_images(calib, shape, "calib_x")
    calib = calib[:config.calib_n].detach().float().cpu()
    onnx_fp = to_onnx(model, shape, config.opset)
    exclude = [] if config.quantize_edges else fp_node_prefixes(model)
    onnx_q, excluded = quantize_int8(onnx_fp, calib, config, exclude)
    settings = {"format": "QDQ", "weights": "int8", "weights_per_channel": config.per_channel,
                "activations": config.activations, "calibration": config.calibration, "opset": config.opset,
                "calibration_images": len(calib), "calibration_source": calibration_source,
                "quantize_edges": config.quantize_edges, "nodes_kept_fp": excluded, "config": config.to_dict()}
    return Engine(onnx_q, shape, "int8", settings, name="onnxruntime-int8", threads=threads)


def quantize_int8(onnx_fp: bytes, calib: torch.Tensor, config: Int8Config, exclude_prefixes=()) -> tuple[bytes, list]:
    """ONNX Runtime's static quantization of an FP ONNX model: (quantized model bytes,
    names of the nodes left float). calib: (N, C, H, W) float32, fed in batches of 128."""
    require("onnx", "deploy")
    q = require("onnxruntime.quantization", "deploy")
    import onnx

    batches = [calib[i:i + 128].numpy() for i in range(0, len(calib), 128)]

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.it = iter([{INPUT: b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
              "percentile": q.CalibrationMethod.Percentile}[config.calibration]
    act = {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}[config.activations]
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory(prefix="rqlab-onnx-") as tmp:
        src, pre, dst = Path(tmp) / "fp.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_fp)
        root.setLevel(logging.ERROR)  # ORT's quantizer logs "consider pre-processing" at WARNING on the root logger
        try:
            q.quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            nodes = onnx.load(str(pre)).graph.node  # names after pre-processing (shape inference, folding)
            excluded = [n.name for n in nodes if any(n.name.startswith(p) for p in exclude_prefixes)]
            q.quantize_static(str(pre), str(dst), Reader(), quant_format=q.QuantFormat.QDQ,
                              per_channel=config.per_channel, weight_type=q.QuantType.QInt8, activation_type=act,
                              calibrate_method=method, nodes_to_exclude=excluded,
                              extra_options={"ActivationSymmetric": config.activations == "int8"})
        finally:
            root.setLevel(level)
        return dst.read_bytes(), excluded


__all__ = ["Int8Config", "Engine", "fp_engine", "int8_engine", "quantize_int8", "ACTIVATIONS", "CALIBRATIONS"]
