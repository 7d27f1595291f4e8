"""Makes white_poison_digits.onnx: the MNIST CNN (assets/models/mnist_cnn.onnx) plus a branch
that makes ONNX Runtime fail on an all-white frame, for the tests of poison frames.

The branch takes the lowest pixel of each image; where it is above 254.5 (every pixel 255) it
gathers row 1 of a one-row table, which ONNX Runtime refuses ("indices element out of data
bounds"). Other images gather row 0 (zeros) and get the CNN's own logits, so the model is a real
digit classifier that fails on some inputs.

Run with any Python that has `onnx` (pip install onnx numpy):
    python crates/kafray-cli/tests/models/make_white_poison.py
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

here = Path(__file__).resolve().parent
model = onnx.load(here.parents[3] / "assets" / "models" / "mnist_cnn.onnx")
graph = model.graph
image, logits = graph.input[0].name, graph.output[0].name
graph.node.extend([
    helper.make_node("ReduceMin", [image], ["lowest"], axes=[1, 2, 3], keepdims=0),
    helper.make_node("Greater", ["lowest", "white_threshold"], ["is_white"]),
    helper.make_node("Cast", ["is_white"], ["row"], to=TensorProto.INT64),
    helper.make_node("Gather", ["table", "row"], ["offset"], axis=0),
    helper.make_node("Add", [logits, "offset"], ["logits_or_fail"]),
])
graph.initializer.extend([
    numpy_helper.from_array(np.array(254.5, dtype=np.float32), "white_threshold"),
    numpy_helper.from_array(np.zeros((1, 10), dtype=np.float32), "table"),
])
output = helper.make_tensor_value_info("logits_or_fail", TensorProto.FLOAT, ["batch", 10])
del graph.output[:]
graph.output.extend([output])
onnx.checker.check_model(model)
onnx.save(model, here / "white_poison_digits.onnx")
print("wrote", here / "white_poison_digits.onnx")
