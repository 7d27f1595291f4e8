"""Makes pool_linear_imagenet.onnx: a deliberately cheap ImageNet-shaped classifier for the
camera-size benchmark (bench/camera.py). It stands in for a model on a GPU, where inference costs
a few microseconds an image in a batch, so that the benchmark shows where kafray's own pipeline
(fetch, decode, preprocess, batch, produce) caps out.

The graph: a 224x224 RGB image (NCHW, ImageNet-normalised, as mobilenet_v2 takes it) ->
GlobalAveragePool (the mean of each channel) -> Flatten -> Gemm to 1000 logits. Its weights are
fixed, not trained: logit k is cos(k) * r + sin(k) * g + cos(2k) * b, so the top class follows
an image's mean colour. It is a real ONNX graph that ONNX Runtime runs, not a classifier to trust.

Run with any Python that has `onnx` (pip install onnx numpy):
    python assets/models/make_pool_linear.py
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

k = np.arange(1000, dtype=np.float64)
weights = np.stack([np.cos(k), np.sin(k), np.cos(2 * k)], axis=0).astype(np.float32)  # 3 x 1000
graph = helper.make_graph(
    [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["colour"], axis=1),
        helper.make_node("Gemm", ["colour", "weights", "bias"], ["logits"]),
    ],
    "pool_linear",
    [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
    [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(np.zeros(1000, np.float32), "bias")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="kafray")
model.ir_version = 8
onnx.checker.check_model(model)
out = Path(__file__).resolve().parent / "pool_linear_imagenet.onnx"
onnx.save(model, out)
print(f"wrote {out} ({out.stat().st_size} bytes)")
