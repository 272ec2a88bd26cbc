"""ONNX tools of dynq: convert models to the ``dynq.DynQMatMul`` op and check their accuracy.

Command line: ``python -m dynq.onnx quantize in.onnx out.onnx`` and
``python -m dynq.onnx evaluate in.onnx out.onnx`` (``--help`` for the options).
"""

from .convert import DOMAIN, OP, LayerRecord, QuantizeOptions, Report, quantize_model, save_model
from .evaluate import Evaluation, evaluate, load_inputs, make_inputs, metrics

__all__ = [
    "DOMAIN",
    "OP",
    "LayerRecord",
    "QuantizeOptions",
    "Report",
    "quantize_model",
    "save_model",
    "Evaluation",
    "evaluate",
    "load_inputs",
    "make_inputs",
    "metrics",
]
