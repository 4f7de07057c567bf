"""The target validator: after export, check every node and attribute against the target profile.

What it checks, on the graph that goes into the package:
- the IR version is one ONNX Runtime accepts (<= 10) and every node's domain is ai.onnx or com.microsoft;
- every com.microsoft op is one the target's profile lists (fused ops only where the target fuses);
- every MatMulNBits node: bits native to the target, block_size one it takes, the target's accuracy_level,
  K and N consistent with the packed weight [N, n_blocks, block_size*bits/8], scales [N*n_blocks] and
  zero points [N, ceil(n_blocks*bits/8)];
- when `expected` (layer -> RewrittenLayer) is given: every expected layer has exactly its node (or its rows
  of a packed node), with the expected bits and block size, and no quantized layer is left as a float MatMul.

It returns a list of problems (empty when valid); `validate_or_raise` turns them into one error.
"""

from __future__ import annotations

import onnx

from edge_recover.errors import EdgeRecoverError

from .matmulnbits import IR_VERSION, MS_DOMAIN
from .rewrite import node_attrs
from .targets import TargetProfile


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.dims) for i in model.graph.initializer}


def _check_mnb(node: onnx.NodeProto, shapes: dict, target: TargetProfile) -> list[str]:
    a = node_attrs(node)
    where = f"node {node.name!r}"
    problems = []
    missing = {"K", "N", "bits", "block_size"} - set(a)
    if missing:
        return [f"{where}: MatMulNBits lacks attributes {sorted(missing)}"]
    k, n, bits, bs = a["K"], a["N"], a["bits"], a["block_size"]
    if bits not in target.native_bits:
        problems.append(f"{where}: {bits}-bit MatMulNBits is not native on target {target.name!r} "
                        f"({'/'.join(map(str, target.native_bits))}-bit)")
    if bs not in target.block_sizes:
        problems.append(f"{where}: block_size {bs} not taken by target {target.name!r}")
    if a.get("accuracy_level", 0) != target.accuracy_level:
        problems.append(f"{where}: accuracy_level {a.get('accuracy_level', 0)} != target's {target.accuracy_level}")
    nb = -(-k // bs)
    expect = {1: (n, nb, bs * bits // 8), 2: (n * nb,), 3: (n, -(-nb * bits // 8))}
    for idx, shape in expect.items():
        if idx >= len(node.input) or not node.input[idx]:
            if idx < 3:
                problems.append(f"{where}: input {idx} is missing")
            continue
        got = shapes.get(node.input[idx])
        if got is None:
            problems.append(f"{where}: input {node.input[idx]!r} is not an initializer")
        elif idx == 2 and got not in ((n * nb,), (n, nb)):
            problems.append(f"{where}: scales shape {got}, expected {(n * nb,)}")
        elif idx != 2 and got != shape:
            problems.append(f"{where}: input {idx} shape {got}, expected {shape}")
    return problems


def validate(model: onnx.ModelProto, target: TargetProfile, expected: dict | None = None) -> list[str]:
    """All problems of `model` for `target` (empty list: valid).

    Example:
        >>> validate(onnx.load("pkg/model.onnx", load_external_data=False), TARGETS["cpu"])  # doctest: +SKIP
        []
    """
    problems = []
    if model.ir_version > IR_VERSION:
        problems.append(f"IR version {model.ir_version} > {IR_VERSION} (ONNX Runtime refuses it)")
    shapes = _shapes(model)
    seen: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx", MS_DOMAIN):
            problems.append(f"node {node.name!r}: domain {node.domain!r} is not supported")
        elif node.domain == MS_DOMAIN and node.op_type not in target.contrib_ops:
            problems.append(f"node {node.name!r}: com.microsoft.{node.op_type} is not taken by target {target.name!r}")
        if node.op_type == "MatMulNBits":
            problems += _check_mnb(node, shapes, target)
            seen[node.name] = node
    for layer, info in (expected or {}).items():
        node = seen.get(info.node)
        if node is None:
            problems.append(f"layer {layer!r}: no MatMulNBits node {info.node!r}")
            continue
        a = node_attrs(node)
        if (a["bits"], a["block_size"]) != (info.storage_bits, info.block_size):
            problems.append(f"layer {layer!r}: node has {a['bits']}-bit b{a['block_size']}, expected "
                            f"{info.storage_bits}-bit b{info.block_size}")
        rows = info.rows or (0, a["N"])  # a packed node (packed_qkv.py) holds the layer in its rows
        if (rows[1] - rows[0], a["K"]) != tuple(info.shape) or rows[1] > a["N"]:
            problems.append(f"layer {layer!r}: node is {a['N']}x{a['K']} (rows {rows[0]}:{rows[1]}), expected "
                            f"{tuple(info.shape)}")
        if any(n.name == info.node.replace("/MatMulNBits", "/MatMul") for n in model.graph.node):
            problems.append(f"layer {layer!r}: a float MatMul is still in the graph")
    if expected is not None and len(seen) != len({info.node for info in expected.values()}):
        problems.append(f"{len(seen)} MatMulNBits nodes, but {len(expected)} quantized layers in "
                        f"{len({info.node for info in expected.values()})} nodes")
    return problems


def validate_or_raise(model: onnx.ModelProto, target: TargetProfile, expected: dict | None = None) -> None:
    """Raise an EdgeRecoverError listing the first problems, if any."""
    problems = validate(model, target, expected)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise EdgeRecoverError(f"graph fails the {target.name!r} validator: {'; '.join(problems[:3])}{more}")
