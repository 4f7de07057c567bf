"""The qnn target end to end on the QNN HTP emulator (onnxruntime-qnn): static graphs, every node on the NPU,
greedy tokens equal to the CPU EP on the same static package, logits near the dynamic graph, EPContext
binaries that reload, a merged adapter, and bad input refused in one line with nothing written.

Each export verifies itself on the emulator (CPU fallback disabled); the tests then check that through the
runtime and the CLI. Emulator sessions are kept small: tiny models, a 40-slot context, a 16-token window.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest

from edge_recover.cli import main
from tests.fixtures.adapters import quantized_checkpoint, random_adapter
from tests.fixtures.tiny_models import save_tiny_model

import onnxruntime_qnn  # noqa: E402,F401  (a test dependency: CI must fail, not skip, without it)

C, W = 40, 16


class _Result:
    def __init__(self, exit_code: int, output: str) -> None:
        self.exit_code, self.output = exit_code, output


def cli(*args) -> _Result:
    """`edge-recover ARGS` in this process, through the CLI's own `main` (its error handling included)."""
    import contextlib
    import io

    out = io.StringIO()
    argv, sys.argv = sys.argv, ["edge-recover", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    return _Result(code, out.getvalue())


def _export(src, out, *extra):
    res = cli("export", src, "-o", out, "--target", "npu", "--vendor", "qualcomm", "--method", "rtn",
              "--calibration", "0", "--context-length", C, "--prefill-window", W, "--soc", "SM8650", *extra)
    assert res.exit_code == 0, res.output
    return out, res.output


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def npu_pkg(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"qnn-{request.param}")
    hf = save_tiny_model(d / "hf", request.param, intermediate=128)
    return _export(hf, d / "pkg")


def _prompt(n: int, vocab: int = 300) -> list[int]:
    return [int(t) for t in np.random.default_rng(7).integers(3, vocab - 3, size=n)]


def test_every_node_on_the_htp_and_the_manifest_says_so(npu_pkg):
    pkg, output = npu_pkg
    m = json.loads((pkg / "manifest.json").read_text())
    st = m["static"]
    v = st["verified"]
    assert st["context_length"] == C and st["window"] == W and v["provider"] == "QNNExecutionProvider"
    assert v["soc"] == {"name": "SM8650", "marketing": "Snapdragon 8 Gen 3", "soc_model": 57, "htp_arch": 75}
    assert v["nodes_on_npu_pct"] == 100.0 and "disabled" in v["cpu_fallback"]
    for role in ("prefill", "decode"):
        g = v["graphs"][role]
        assert g["kernels"] == {"QNNExecutionProvider": 1} and g["npu_share"] == 1.0  # one QNN partition, no CPU kernel
        graph = onnx.load(str(pkg / st["graphs"][role]["file"]), load_external_data=False)
        assert g["graph_nodes"] == len(graph.graph.node)
        for i in list(graph.graph.input) + list(graph.graph.output):  # static: no symbolic dimension left
            assert all(d.dim_value > 0 for d in i.type.tensor_type.shape.dim), i.name
        assert not {n.op_type for n in graph.graph.node} & {"Shape", "Range", "ConstantOfShape", "Cos", "Sin"}
        assert g["parity_vs_cpu"]["top1_agreement"] == 1.0
    assert "100 % of nodes on the NPU" in output and "emulator time, not NPU speed" in output
    assert "context binaries: 2, " in output and "one shared binary would save up to" in output
    # the qnn target's head is 4-bit MatMulNBits and the tied embedding gathers its integers with plain ops (the
    # HTP has no GatherBlockQuantized): no float [V, K] table left in any graph
    assert m["layers"]["lm_head"]["bits"] == 4 and m["embedding"] == "lm_head integers"
    for f in ("model.onnx", st["graphs"]["prefill"]["file"], st["graphs"]["decode"]["file"]):
        graph = onnx.load(str(pkg / f), load_external_data=False)
        inits = {i.name: i for i in graph.graph.initializer}
        gathers = [n for n in graph.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
        tables = [inits.get(n.input[0]) for n in gathers]
        assert inits["lm_head.embed_codes"].data_type == onnx.TensorProto.UINT8, f
        assert all(t is None or len(t.dims) == 3 for t in tables), f  # [V, k_blocks, 1] scales / zero points
        assert not any(n.op_type == "GatherBlockQuantized" for n in graph.graph.node), f
    # both static graphs and the dynamic one read one data file: the weights are stored once
    assert st["weights_shared"]["shared_tensors"] > 0
    assert sorted(p.name for p in pkg.glob("*.data")) == ["model.onnx.data"]


def test_greedy_tokens_equal_the_cpu_provider_on_the_same_static_package(npu_pkg):
    from edge_recover.runtimes.generate import generate_ids
    from edge_recover.runtimes.static_session import StaticCausalLM

    pkg, _ = npu_pkg
    prompt = _prompt(W + 5)  # a full window, then a padded partial one
    runs = {}
    for provider in ("cpu", "qnn"):
        lm = StaticCausalLM(pkg, provider)
        runs[provider] = generate_ids(lm, prompt, max_new_tokens=16).tokens
    print("cpu", runs["cpu"], "\nqnn", runs["qnn"])
    assert len(runs["cpu"]) == 16 and runs["qnn"] == runs["cpu"]


def test_htp_logits_within_fp16_tolerance_of_the_dynamic_graph(npu_pkg):
    import onnxruntime as ort

    from edge_recover.runtimes.static_session import StaticCausalLM

    pkg, _ = npu_pkg
    ids = np.asarray([_prompt(W + 9)], np.int64)
    dyn = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    for i in dyn.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    ref = dyn.run(["logits"], feeds)[0][0]
    cpu = StaticCausalLM(pkg, "cpu")
    static_cpu, _ = cpu.prefill(ids, cpu.empty_cache(), all_logits=True)
    htp = StaticCausalLM(pkg, "qnn")
    static_htp, _ = htp.prefill(ids, htp.empty_cache(), all_logits=True)
    scale = float(np.abs(ref).max())
    d_cpu, d_htp = float(np.abs(static_cpu - ref).max()), float(np.abs(static_htp - ref).max())
    print(f"static cpu vs dynamic {d_cpu:.3g}; HTP (fp16) vs dynamic {d_htp:.3g}, mean "
          f"{np.abs(static_htp - ref).mean():.3g}, logit scale {scale:.3g}")
    assert d_cpu < 1e-4 * max(scale, 1.0)  # the static graph is the same function
    assert 0 < d_htp < 2e-2 * max(scale, 1.0)  # fp16 on the HTP: close, not bit-equal
    assert (static_htp.argmax(-1) == ref.argmax(-1)).mean() == 1.0


def test_epcontext_binaries_reload_without_compiling(npu_pkg):
    from edge_recover.runtimes.static_session import StaticCausalLM

    pkg, _ = npu_pkg
    v = json.loads((pkg / "manifest.json").read_text())["static"]["verified"]
    for role, ctx in v["contexts"].items():
        graph = onnx.load(str(pkg / ctx["file"]), load_external_data=False)
        assert {n.op_type for n in graph.graph.node} == {"EPContext"}  # nothing left to compile
        assert ctx["binary_bytes"] > 0 and all((pkg / b).is_file() for b in ctx["binaries"])
        assert ctx["max_abs_diff_vs_compiled"] == 0.0
    ids = np.asarray([_prompt(W + 3)], np.int64)
    from_ctx = StaticCausalLM(pkg, "qnn")
    compiled = StaticCausalLM(pkg, "qnn", use_contexts=False)
    assert "prefill_ctx.onnx" in from_ctx.loaded_from and "prefill.onnx" in compiled.loaded_from
    a, _ = from_ctx.prefill(ids, from_ctx.empty_cache(), all_logits=True)
    b, _ = compiled.prefill(ids, compiled.empty_cache(), all_logits=True)
    assert np.abs(a - b).max() < 1e-5


def test_run_and_profile_cli_on_the_htp(npu_pkg, tmp_path):
    pkg, _ = npu_pkg
    res = cli("run", pkg, "--provider", "qnn", "-p", "the quick brown fox", "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    assert "on qnn (prefill_ctx.onnx, decode_ctx.onnx on the HTP for SM8650 (x86: Qualcomm's HTP emulator" in res.output
    res = cli("run", pkg, "--provider", "cpu", "-p", "the quick brown fox", "--max-new-tokens", "4")
    assert res.exit_code == 0 and "on cpu (portable static graphs; static context 40" in res.output, res.output
    res = cli("profile", pkg, "--provider", "qnn", "--prompt-lengths", "20", "--new-tokens", "4",
              "--repeats", "1", "--warmup", "0", "-o", tmp_path / "prof")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "prof" / "report.json").is_file()


def test_merged_adapter_on_the_htp(tmp_path):
    from edge_recover.runtimes.generate import generate_ids
    from edge_recover.runtimes.static_session import StaticCausalLM

    ckpt = quantized_checkpoint(save_tiny_model(tmp_path / "hf", "qwen3", intermediate=128), tmp_path / "ckpt")
    adapter = random_adapter(ckpt, tmp_path / "a", rank=4, seed=1)
    pkg, _ = _export(ckpt, tmp_path / "pkg", "--adapter", str(adapter), "--adapter-mode", "merge",
                     "--merge-method", "rtn")
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["adapter_mode"] == "merge" and m["static"]["verified"]["nodes_on_npu_pct"] == 100.0
    prompt = _prompt(W + 2)
    tokens = {p: generate_ids(StaticCausalLM(pkg, p), prompt, max_new_tokens=16).tokens for p in ("cpu", "qnn")}
    assert tokens["qnn"] == tokens["cpu"]


# ─── bad input: one line, exit 2, nothing written ──────────────────────────────────────────────────────

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("qnn-bad") / "hf", "llama", intermediate=128)


def _refused(args, out):
    res = cli(*args)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("flags, says", [
    (["--soc", "SM9999"], "unknown `--soc`"),
    (["--block-size", "256"], "blocks of 256 are not taken"),
    (["--block-size", "128"], "not a whole number of 128-blocks"),  # K = 64 (hidden)
    (["--scheme", "w8"], "cannot run 8-bit"),
    (["--context-length", "100000"], "exceeds the model's"),
])
def test_bad_export_input(tiny_hf, tmp_path, flags, says):
    out = tmp_path / "pkg"
    line = _refused(["export", tiny_hf, "-o", out, "--target", "qnn", "--method", "rtn", "--calibration", "0",
                     *flags], out)
    assert says in line


def test_onnxruntime_qnn_missing(tiny_hf, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # `import onnxruntime_qnn` now fails
    out = tmp_path / "pkg"
    line = _refused(["export", tiny_hf, "-o", out, "--target", "qnn", "--method", "rtn", "--calibration", "0"], out)
    assert "onnxruntime-qnn" in line


def test_prompt_longer_than_the_context(npu_pkg, tmp_path):
    pkg, _ = npu_pkg
    res = cli("run", pkg, "--provider", "qnn", "-p", "to be or not to be " * 20)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "context" in lines[0], res.output


def test_npu_without_vendor_says_it_is_not_verified(tiny_hf, tmp_path):
    out = tmp_path / "pkg"
    res = cli("export", tiny_hf, "-o", out, "--target", "npu", "--method", "rtn", "--calibration", "0")
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["name"] == "vitisai" and "static" not in m
    assert m["npu_verification"].startswith("not verified on an NPU") and "not verified on an NPU" in res.output


@pytest.mark.slow
def test_the_same_static_graphs_on_openvino(npu_pkg):
    """OpenVINO's CPU device (its own venv, runtimes/openvino_venv.sh, created if missing) runs the static
    graphs with the CPU EP's greedy tokens, the MatMulNBits inside OpenVINO."""
    import subprocess
    from pathlib import Path

    from edge_recover.runtimes.profiler import PackageEntry, Worker

    repo = Path(__file__).resolve().parents[2]
    python = repo / ".venv-openvino" / "bin" / "python"
    if not python.exists():
        subprocess.run(["bash", str(repo / "runtimes" / "openvino_venv.sh")], check=True, timeout=1500)
    pkg, _ = npu_pkg
    prompt, tokens = _prompt(W + 5), {}
    for provider, py in (("cpu", sys.executable), ("openvino", str(python))):
        w = Worker(PackageEntry(str(pkg), python=py))
        try:
            info = w.ask(op="load", package=str(pkg), provider=provider, threads=1)
            assert info["session_providers"][0] == {"cpu": "CPUExecutionProvider",
                                                    "openvino": "OpenVINOExecutionProvider"}[provider]
            tokens[provider] = w.ask(op="run", ids=prompt, new_tokens=16)["ids"]
        finally:
            w.close()
    assert len(tokens["cpu"]) == 16 and tokens["openvino"] == tokens["cpu"]
    probe = ("import onnxruntime as ort, sys; so = ort.SessionOptions(); so.log_severity_level = 0; "
             "ort.InferenceSession(sys.argv[1], so, providers=[('OpenVINOExecutionProvider', "
             "{'device_type': 'CPU', 'precision': 'ACCURACY'})])")
    log = subprocess.run([str(python), "-c", probe, str(pkg / "decode.onnx")], capture_output=True, text=True,
                         timeout=600).stderr
    assert "Node(s) placed on [OpenVINOExecutionProvider]" in log
    cpu_part = log.split("Node(s) placed on [CPUExecutionProvider]")[-1] if "placed on [CPUExecutionProvider]" in log else ""
    assert "MatMulNBits" not in cpu_part.split("VerifyEachNodeIsAssignedToAnEp] Some nodes")[0]
