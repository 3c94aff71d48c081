"""Export an rqlab model (or a `quant.convert`ed one) to ONNX at full precision, with the
torch.onnx legacy (TorchScript-tracing) exporter.

    >>> onnx_bytes = to_onnx(model)                  # FP graph; the engine quantizes it itself
    >>> fp_node_prefixes(model)                       # ['/conv1/', '/fc2/']: the layers kept FP

The exported graph is the model at FP: every quantized layer at 32 bits, input checks
off, eval mode (batch norm folded into the convolutions by the exporter). A model with
switchable batch norm exports with the branch of `bn_bits` (the engine's precision),
its weights still float. A layer the exporter cannot translate stops the export with an
RqlabError that names the layer (its module path) and the operator.
"""
from __future__ import annotations

import contextlib
import io
import re
import warnings

import torch
import torch.nn as nn

from .. import quant
from ..extras import require
from ..models.state import prepared
from ..quant.layers import SwitchableBatchNorm2d
from ..validate import RqlabError, check_int

OPSET = 17
INPUT, OUTPUT = "x", "logits"


def input_shape_of(model: nn.Module, input_shape=None) -> tuple[int, ...]:
    """(C, H, W) of the model's inputs: `input_shape` if given, else model.input_shape."""
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise RqlabError("input_shape: this model has no .input_shape; give input_shape=(C, H, W)")
    if not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise RqlabError(f"input_shape={shape!r} must be (C, H, W), three positive integers")
    return tuple(shape)


@contextlib.contextmanager
def fp_graph(model: nn.Module, bn_bits: int = 8):
    """The model as it is exported: eval mode, frozen parameters, input checks off, every
    quantized layer at FP; with switchable batch norm, the branch of `bn_bits`."""
    has_sbn = any(isinstance(m, SwitchableBatchNorm2d) for m in model.modules())
    policy = quant.Fixed(bn_bits) if has_sbn else quant.Fixed(32)
    layers = quant.quant_layers(model, include_fp=True)
    with prepared(model, policy):
        saved = [(m, m.w_bits, m.a_bits) for _, m in layers]
        try:
            for _, m in layers:
                m.w_bits = m.a_bits = 32
            yield model
        finally:
            for m, w, a in saved:
                m.w_bits, m.a_bits = w, a


def to_onnx(model: nn.Module, input_shape=None, opset: int = OPSET, bn_bits: int = 8) -> bytes:
    """The ONNX model (bytes) of `model` at FP, batch dimension dynamic: input "x"
    (B, C, H, W) float32 in [0, 1], output "logits" (B, classes).

    Raises RqlabError naming the layer when an operator has no ONNX translation, and
    ImportError naming the extra when onnx is missing."""
    require("onnx", "deploy")
    opset = check_int(opset, "opset", 13)
    shape = input_shape_of(model, input_shape)
    dummy = torch.rand(2, *shape, device=_device(model))
    buf = io.BytesIO()
    with fp_graph(model, bn_bits), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        try:
            torch.onnx.export(model, dummy, buf, dynamo=False, opset_version=opset, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        except Exception as e:  # the exporter raises OnnxExporterError, RuntimeError, ...
            failure = e
        else:
            return buf.getvalue()
    raise RqlabError(_export_error(model, dummy, failure, bn_bits)) from failure


def fp_node_prefixes(model: nn.Module) -> list[str]:
    """ONNX node-name prefixes ("/conv1/") of the layers the fake-quant model keeps FP
    (keep_fp: by default the first conv and the last linear). The legacy exporter names
    a module's nodes after its path, e.g. "/conv1/Conv", "/features/0/Conv"."""
    return ["/" + name.replace(".", "/") + "/" for name, m in quant.quant_layers(model, include_fp=True)
            if m.keep_fp]


def _device(model: nn.Module):
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _export_error(model: nn.Module, dummy: torch.Tensor, err: Exception, bn_bits: int) -> str:
    """The export failure as a message naming the layer: the first module, innermost, in
    which the failing operator ran during a plain forward pass."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    m = re.search(r"operator '([\w:.]+)'", str(err))
    op = m.group(1) if m else None
    layer = _layer_running(model, dummy, op, bn_bits) if op else None
    if layer is not None:
        path, kind = layer
        return (f"model: cannot export layer {path!r} ({kind}) to ONNX: {text}. Replace that layer with "
                "supported operations (conv, linear, batch norm, ReLU, pooling, ...) or export at another opset")
    return f"model: cannot export to ONNX: {text}"


def _layer_running(model: nn.Module, dummy: torch.Tensor, op: str, bn_bits: int):
    """(module path, class name) of the innermost module in which aten operator `op`
    (e.g. "aten::i0") first runs in a forward pass of `model` on `dummy`, or None."""
    from torch.utils._python_dispatch import TorchDispatchMode

    want = op.replace("::", ".")
    stack, found, hooks = [], [], []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)  # "aten.i0"
            if not found and stack and name == want:
                found.append(stack[-1])
            return func(*args, **(kwargs or {}))

    for path, mod in model.named_modules():
        if path:
            hooks.append(mod.register_forward_pre_hook(lambda m, a, p=path: stack.append((p, type(m).__name__))))
            hooks.append(mod.register_forward_hook(lambda m, a, o: stack.pop() and None))  # None: keep the output
    try:
        with fp_graph(model, bn_bits), torch.no_grad(), Spy():
            model(dummy)
    except Exception:
        pass  # the spy only looks for the operator; the export error is the one to report
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


__all__ = ["to_onnx", "fp_node_prefixes", "fp_graph", "input_shape_of", "OPSET", "INPUT", "OUTPUT"]
