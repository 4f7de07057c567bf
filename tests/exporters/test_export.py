"""Packages from tiny random Llama/Qwen3 models: per scheme and target, the graph holds the expected
MatMulNBits bits per layer with the very integers of the torch model, passes its validator, and matches torch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge_recover.apply import quantized_layers
from edge_recover.exporters.api import export_package, read_package_manifest
from edge_recover.exporters.targets import TARGETS
from edge_recover.exporters.validate import validate
from edge_recover.packing import unpack_codes, unpack_zero_points
from edge_recover.pipeline import quantize_loaded
from edge_recover.scheme import load_scheme

from .conftest import make_loaded


def _mnb_nodes(model: onnx.ModelProto) -> dict[str, dict]:
    return {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node if n.op_type == "MatMulNBits"}


def _expected_bits(layer: str, scheme: str, target: str = "cpu") -> int:
    if layer == "lm_head":  # a named scheme's head is the target's (cpu: 8-bit)
        return TARGETS[target].head.bits
    return 2 if scheme == "w4w2gateup" and layer.endswith(("gate_proj", "up_proj")) else 4


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("scheme", ["w4", "w4w2gateup"])
@pytest.mark.parametrize("target", ["cpu", "dml", "qnn", "openvino", "vitisai"])
def test_package_per_scheme_and_target(tmp_path, arch, scheme, target):
    lm = make_loaded(arch)
    pkg = export_package(lm, tmp_path / "pkg", scheme=scheme, target=target, method="rtn", calibration=0)
    manifest = read_package_manifest(pkg)
    prof = TARGETS[target]
    graph = onnx.load(str(pkg / "model.onnx"))
    assert validate(graph, prof, None) == []
    nodes = _mnb_nodes(graph)
    qlayers = quantized_layers(lm.model)
    packed = target == "cpu"  # fused graphs: q/k/v in one node (Qwen3: then a Split before its head norms)
    head = int(prof.head is not None)  # cpu: the 8-bit head; the other targets keep it float
    assert len(qlayers) == 2 * 7 + head and len(nodes) == 2 * (5 if packed else 7) + head  # q k v o gate up down
    by_name = {n.name: n for n in graph.graph.node}
    inits = {i.name: numpy_helper.to_array(i, base_dir=str(pkg)) for i in graph.graph.initializer}
    for name, q in qlayers.items():
        bits = _expected_bits(name, scheme, target)
        storage = bits if bits in prof.native_bits else 4
        node_name = "/" + name.replace("model.layers.", "model/layers.").replace(".self_attn.", "/self_attn/").replace(".mlp.", "/mlp/") + "/MatMulNBits"
        if packed and name.endswith(("q_proj", "k_proj", "v_proj")):
            node_name = node_name.rsplit("/", 2)[0] + "/qkv_proj/MatMulNBits"
        layer = manifest["layers"][name]
        assert layer["node"] == node_name  # the manifest names the node (and the rows) that hold the layer
        attrs = nodes[node_name]
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (storage, prof.preferred_block_size, prof.accuracy_level)
        assert layer["bits"] == bits and layer["storage_bits"] == storage
        # the very integers of the torch QuantLinear, in the manifest's rows of its node
        start, stop = layer.get("rows", (0, attrs["N"]))
        assert stop - start == q.out_features
        b, sc, zp = (inits[i] for i in by_name[node_name].input[1:4])
        nb = q.scales.shape[1]
        codes = unpack_codes(b[start:stop], storage, q.in_features)
        zps = unpack_zero_points(zp.reshape(attrs["N"], -1)[start:stop], storage, nb)
        np.testing.assert_array_equal(codes, q.codes.numpy())
        np.testing.assert_array_equal(zps, q.zero_points.numpy())
        np.testing.assert_array_equal(sc.reshape(-1)[start * nb:stop * nb], q.scales.numpy().reshape(-1))
    parity = manifest["parity"]
    exact = parity["exact"]  # accuracy_level 0: fp32 dequantization, the same function as torch
    assert parity["ok"] and exact["top1_agreement"] == 1.0
    assert exact["max_abs_diff"] / exact["logit_scale"] < 1e-4
    assert parity["accuracy_level"] == prof.accuracy_level
    # the shipped graph: level 4 (int8 activations) is an approximation, level 0 is the exact graph itself
    rel = parity["max_abs_diff"] / parity["logit_scale"]
    assert rel < (0.05 if prof.accuracy_level == 4 else 1e-4), rel
    assert manifest["containers"]["layers"] == (4 if scheme == "w4w2gateup" and 2 not in prof.native_bits else 0)


def test_block_size_per_bit_width_reaches_the_graph(tmp_path):
    lm = make_loaded("qwen3")
    pkg = export_package(lm, tmp_path / "pkg", scheme="w4w2gateup", method="rtn", calibration=0, block_size="2:128")
    blocks = {(a["bits"], a["block_size"]) for a in _mnb_nodes(onnx.load(str(pkg / "model.onnx"))).values()}
    pref = TARGETS["cpu"].preferred_block_size
    assert blocks == {(4, pref), (2, 128), (8, pref)}  # 4-bit (and the 8-bit head) keep the target's block
    assert read_package_manifest(pkg)["parity"]["ok"]


def test_block_size_the_target_cannot_take_is_refused_before_quantizing(tmp_path):
    from edge_recover.errors import EdgeRecoverError

    with pytest.raises(EdgeRecoverError, match="2-bit blocks of 256 are not taken by target 'qnn'"):
        export_package(make_loaded("qwen3"), tmp_path / "pkg", scheme="w4w2gateup", target="qnn", method="rtn",
                       calibration=0, block_size="2:256")
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("kv_dtype, elem, fraction, tolerance", [("float16", onnx.TensorProto.FLOAT16, 2, 0.02),
                                                                 ("int8", onnx.TensorProto.INT8, 4, 0.03)])
def test_smaller_kv_cache(tmp_path, arch, kv_dtype, elem, fraction, tolerance):
    """A float16 / int8 KV cache: a half / a quarter of the KV bytes, logits close to the float32 cache's, both
    cache paths agree."""
    from edge_recover.runtimes.generate import generate_ids
    from edge_recover.runtimes.package import open_package
    from edge_recover.runtimes.session import OrtCausalLM

    lm = make_loaded(arch)
    p32 = export_package(lm, tmp_path / "f32", scheme="w4w2gateup", method="rtn", calibration=0)
    small = export_package(lm, tmp_path / kv_dtype, scheme="w4w2gateup", method="rtn", calibration=0, kv_dtype=kv_dtype)
    m = read_package_manifest(small)
    assert m["kv_dtype"] == kv_dtype and m["parity"]["ok"] and f"{kv_dtype} KV cache" in " ".join(m["fusions"])
    assert m["parity"]["exact"]["top1_agreement"] == 1.0
    graph = onnx.load(str(small / "model.onnx"), load_external_data=False).graph
    kv = [v for v in list(graph.input) + list(graph.output) if v.name.startswith(("past_key_values.", "present."))]
    assert kv and {v.type.tensor_type.elem_type for v in kv} == {elem}
    s32, s_small = open_package(p32).stats, open_package(small).stats
    assert fraction * s_small.kv_bytes_per_position() == s32.kv_bytes_per_position()
    prompt = list(range(3, 40))
    a, b = OrtCausalLM(p32, threads=1), OrtCausalLM(small, threads=1)
    la, _ = a.step(np.array([prompt]), a.empty_cache())
    lb, _ = b.step(np.array([prompt]), b.empty_cache())
    assert np.abs(la - lb).max() < tolerance * np.abs(la).max()
    # the shared-buffer cache and the growing cache give the same tokens
    shared = generate_ids(b, prompt, 12, stop_token_ids=()).tokens
    growing = generate_ids(OrtCausalLM(small, threads=1, share_buffer=False), prompt, 12, stop_token_ids=()).tokens
    assert b.share_buffer and shared == growing


@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_smaller_kv_cache_needs_fused_attention(tmp_path, kv_dtype):
    from edge_recover.errors import EdgeRecoverError

    with pytest.raises(EdgeRecoverError, match=f"{kv_dtype} KV cache needs the fused attention"):
        export_package(make_loaded("qwen3"), tmp_path / "p", scheme="w4", method="rtn", calibration=0,
                       kv_dtype=kv_dtype, fuse=False)
    with pytest.raises(EdgeRecoverError, match="unknown `kv_dtype` 'int4'"):
        export_package(make_loaded("qwen3"), tmp_path / "p", scheme="w4", method="rtn", calibration=0, kv_dtype="int4")
    assert not (tmp_path / "p").exists()


def test_no_transpose_of_weights_and_tied_embedding_stored_once(tmp_path):
    lm = make_loaded("llama")
    pkg = export_package(lm, tmp_path / "pkg", scheme=load_scheme("w4", ["lm_head=keep"]), method="rtn", calibration=0)
    graph = onnx.load(str(pkg / "model.onnx"))
    inits = {i.name: i for i in graph.graph.initializer}
    assert not [n.name for n in graph.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    head = next(n for n in graph.graph.node if n.name == "/lm_head/MatMul")
    gathers = [n for n in graph.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    assert [g.input[0] for g in gathers] == [head.input[1]]  # the embedding reads the lm_head matrix
    vocab, hidden = lm.model.config.vocab_size, lm.model.config.hidden_size
    big = [n for n, i in inits.items() if list(i.dims) in ([vocab, hidden], [hidden, vocab])]
    assert big == [head.input[1]]
    assert graph.ir_version <= 10


def test_package_files_and_genai_config(tmp_path, tiny_dirs):
    pkg = export_package(tiny_dirs["qwen3"], tmp_path / "pkg", scheme="w4w2gateup", method="mse", calibration=2)
    for f in ("model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json", "config.json",
              "genai_config.json", "manifest.json"):
        assert (pkg / f).is_file(), f
    # the weights are as readable as the graph (onnx makes its data file owner-only)
    assert (pkg / "model.onnx.data").stat().st_mode & 0o777 == (pkg / "model.onnx").stat().st_mode & 0o777
    m = read_package_manifest(pkg)
    assert m["kind"] == "edge-recover-package" and m["format_version"] == 1
    assert m["scheme"]["name"] == "w4w2gateup" and m["method"] == "mse"
    assert m["source_hash"].startswith("sha256:") and "onnxruntime" in m["versions"]
    gc = json.loads((pkg / "genai_config.json").read_text())["model"]
    sess_inputs = {i.name for i in onnx.load(str(pkg / "model.onnx"), load_external_data=False).graph.input}
    assert gc["decoder"]["inputs"]["past_key_names"] % 1 in sess_inputs
    assert gc["decoder"]["num_hidden_layers"] == 2 and gc["decoder"]["head_size"] == 16 and gc["type"] == "qwen3"


@pytest.mark.parametrize("arch, head_bits", [("llama", 8), ("qwen3", 4)])
def test_tied_embedding_reads_the_quantized_head(tmp_path, arch, head_bits):
    """With a quantized head, a tied embedding is GatherBlockQuantized over the head's own B: no float
    vocabulary table in the package, the same tokens as the float-table package's torch twin, exact parity."""
    from edge_recover.exporters.embedding import HEAD
    from edge_recover.runtimes.generate import generate_ids
    from edge_recover.runtimes.session import OrtCausalLM
    from edge_recover.scheme import load_scheme

    scheme = load_scheme("w4w2gateup", [f"lm_head={head_bits}"])
    lm = make_loaded(arch)
    shared = export_package(lm, tmp_path / "shared", scheme=scheme, method="rtn", calibration=0)
    floated = export_package(make_loaded(arch), tmp_path / "float", scheme=scheme, method="rtn", calibration=0,
                             share_embedding=False)
    m, mf = read_package_manifest(shared), read_package_manifest(floated)
    assert m["embedding"] == "lm_head integers" and mf["embedding"] == "float32 (share_embedding=False)"
    assert m["parity"]["exact"]["top1_agreement"] == 1.0
    assert m["parity"]["exact"]["max_abs_diff"] / m["parity"]["exact"]["logit_scale"] < 1e-5  # torch re-tied
    graph = onnx.load(str(shared / "model.onnx"))
    gbq = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1 and gbq[0].input[0] == f"{HEAD}.qweight"
    vocab, hidden = lm.model.config.vocab_size, lm.model.config.hidden_size
    float_tables = [i for i in graph.graph.initializer if sorted(i.dims) == sorted([vocab, hidden]) and i.data_type == 1]
    assert float_tables == []
    size = lambda p: (p / "model.onnx.data").stat().st_size
    assert size(floated) - size(shared) > 0.75 * 4 * vocab * hidden  # the float table, less a copy of the scales
    # the embedding rows are the head's dequantized rows: torch (re-tied) and the package generate alike
    ids = generate_ids(OrtCausalLM(shared, threads=1), list(range(3, 30)), 10, stop_token_ids=()).tokens
    import torch

    with torch.no_grad():
        out = lm.model.generate(torch.tensor([list(range(3, 30))]), max_new_tokens=10, do_sample=False)
    assert ids == out[0, 27:].tolist()


def test_embedding_stays_float_when_not_tied_or_head_float(tmp_path):
    lm = make_loaded("qwen3")
    pkg = export_package(lm, tmp_path / "a", scheme=load_scheme("w4", ["lm_head=keep"]), method="rtn", calibration=0)
    assert read_package_manifest(pkg)["embedding"] == "float32 (the lm_head is not quantized)"
    pkg = export_package(make_loaded("qwen3"), tmp_path / "c", scheme="w4", method="rtn", calibration=0)
    assert read_package_manifest(pkg)["embedding"] == "lm_head integers"  # the cpu target's 8-bit head, shared

    lm = make_loaded("qwen3")
    lm.model.config.tie_word_embeddings = False
    pkg = export_package(lm, tmp_path / "b", scheme=load_scheme("w4", ["lm_head=8"]), method="rtn", calibration=0,
                         share_embedding=False)
    assert read_package_manifest(pkg)["embedding"] == "float32 (share_embedding=False)"
    assert not any(n.op_type == "GatherBlockQuantized" for n in onnx.load(str(pkg / "model.onnx")).graph.node)


def test_untied_embedding_gets_its_own_8bit_table(tmp_path):
    """An untied model with a quantized head (e.g. `edge-recover rotate`'s output) embeds from its own table's
    8-bit integers (GatherBlockQuantized) instead of a float table: a quarter of the bytes, and the package still
    equals torch, whose embedding reads the same integers (sdk/shared_head.py QuantizedTableEmbedding)."""
    import torch

    from edge_recover.shared_head import QuantizedTableEmbedding, share_quantized_head, table_quantization

    def untied():
        lm = make_loaded("qwen3")
        emb = lm.model.get_input_embeddings()
        emb.weight = torch.nn.Parameter(emb.weight.detach().clone() + 0.01 * torch.randn_like(emb.weight))
        lm.model.config.tie_word_embeddings = False
        return lm

    own = export_package(untied(), tmp_path / "own", scheme=load_scheme("w4", ["lm_head=8"]), method="rtn", calibration=0)
    flt = export_package(untied(), tmp_path / "float", scheme=load_scheme("w4", ["lm_head=8"]), method="rtn",
                         calibration=0, share_embedding=False)
    assert read_package_manifest(own)["embedding"] == "own 8-bit table"
    nodes = onnx.load(str(own / "model.onnx")).graph.node
    assert [n.op_type for n in nodes].count("GatherBlockQuantized") == 1 and not any(
        n.op_type == "Gather" and n.input[1] == "input_ids" for n in nodes)
    assert (own / "model.onnx.data").stat().st_size < (flt / "model.onnx.data").stat().st_size
    ex = read_package_manifest(own)["parity"]["exact"]
    assert ex["max_abs_diff"] < 1e-4 * max(1.0, ex.get("logit_scale", 1.0)), ex  # torch embeds from the same integers
    lm = untied()
    quantize_loaded(lm, load_scheme("w4", ["lm_head=8"]).with_target_block_size(32), method="rtn", calibration=0,
                    progress=False)
    assert share_quantized_head(lm.model) and isinstance(lm.model.get_input_embeddings(), QuantizedTableEmbedding)
    qw = table_quantization(lm.model)
    assert qw.config.bits == 8 and qw.config.block_size == 32
    table = lm.model.get_input_embeddings().table
    assert torch.equal(table, qw.dequantize()) and not torch.equal(table, lm.model.get_input_embeddings().weight)
