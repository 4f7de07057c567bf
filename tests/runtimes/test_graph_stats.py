"""Weight bytes per decoded token: a Gather-only table counts one row, a tied table that a MatMul also
reads counts in full, GroupQueryAttention's rotary caches count one row; symbolic KV dims can be filled."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_recover.runtimes.package import graph_stats


def _model(tmp_path, tied: bool, kv_dims=(1, 2, "past", 4)):
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "E")       # 160 bytes, 16 per row
    head = numpy_helper.from_array(np.zeros((4, 10), np.float32), "W")        # an untied lm_head
    rot = numpy_helper.from_array(np.zeros((8, 2), np.float32), "cos")        # 64 bytes, 8 per row
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "E_t" if tied else "W"], ["logits"]),
             helper.make_node("GroupQueryAttention", ["h", "h", "h", "", "", "", "", "cos", "cos"], ["a"],
                              domain="com.microsoft")]
    inits = [table, rot] + ([] if tied else [head])
    if tied:
        nodes.insert(0, helper.make_node("Transpose", ["E"], ["E_t"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"]),
                                           helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT,
                                                                         list(kv_dims))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / f"m{int(tied)}.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_tied_table_counts_in_full(tmp_path):
    untied = graph_stats(_model(tmp_path, tied=False))
    assert untied.weight_bytes == 160 + 160 + 64
    assert untied.weight_bytes_per_token == 16 + 160 + 8
    tied = graph_stats(_model(tmp_path, tied=True))
    assert tied.weight_bytes_per_token == 160 + 8


def test_symbolic_kv_dims_filled(tmp_path):
    stats = graph_stats(_model(tmp_path, tied=False, kv_dims=("b", 2, "past", "head_size")), kv_layout=(2, 4))
    assert (stats.kv_heads, stats.head_dim) == (2, 4)
