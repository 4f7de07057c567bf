"""The family table (sdk/layouts.py): each layout names modules its tiny model has, and every allow-list
(loading, fused attention, genai_config) reads that one table."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from edge_recover.errors import EdgeRecoverError
from edge_recover.layouts import LAYOUTS, Attention, Layout, layout_for, register, role_pattern, supported, unregister
from tests.fixtures.tiny_models import make_tiny_model

FAMILIES = ("llama", "mistral", "phi3", "qwen2", "qwen3")
NAMES = "llama, mistral, phi3, qwen2, qwen3"


def test_registered_families():
    assert supported() == FAMILIES


@pytest.mark.parametrize("arch", FAMILIES)
def test_layout_matches_tiny_model(arch):
    model, _ = make_tiny_model(arch, layers=1)
    layout = layout_for(model.config)
    assert layout.model_type == model.config.model_type == arch
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    # every linear layer of the decoder is one the layout names, and each named one is a Linear
    linears = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    assert linears == set(layout.linear_names(0)) | {layout.head}
    at, base = layout.attention, f"{layout.layer(0)}.{layout.attention.module}"
    for proj in at.projections():
        role = next(r for r in ("q", "k", "v", "o", "qkv") if getattr(at, r) == proj)
        has_bias = modules[f"{base}.{proj}"].bias is not None
        assert has_bias == (role in at.biases), (arch, role)
    assert (at.qkv is not None) == (layout.mlp.gate_up is not None) == (arch == "phi3")
    for norm in (at.q_norm, at.k_norm):
        if norm is not None:
            assert f"{base}.{norm}.weight" in params
    assert (at.q_norm is None) == (arch != "qwen3")
    for name in (f"{layout.layer(0)}.{layout.input_norm}", f"{layout.layer(0)}.{layout.post_attention_norm}",
                 layout.final_norm, layout.embedding, layout.head):
        assert name in modules, (arch, name)
    assert isinstance(modules[layout.embedding], torch.nn.Embedding)
    assert layout.tied(model.config) == (params[f"{layout.head}.weight"] is params[f"{layout.embedding}.weight"])
    assert sum(layout.qkv_split(model.config)) == sum(
        modules[f"{base}.{p}"].out_features for p in at.projections()[:-1])  # qkv, or q, k and v
    assert layout.norm == "rms" and layout.genai_type == arch and layout.fused_attention


SPLIT_MLP = ("llama", "mistral", "qwen2", "qwen3")  # gate and up apart: the rule's spelling since before Phi-3


def test_role_pattern_is_the_schemes_gate_up_rule():
    """w4w2gateup's rule is the same regex as before Phi-3 was registered, byte for byte, and applied to the
    four split-MLP families unchanged (their scheme JSON and manifests do not change); Phi-3 gets its own
    spelling, the one fused gate_up at 2 bits."""
    from edge_recover.scheme import named_scheme

    before = r"mlp\.(gate_proj|up_proj)$"  # the pattern w4w2gateup packages have always recorded
    assert role_pattern("gate", "up", layouts=[LAYOUTS[a] for a in SPLIT_MLP]) == before
    assert role_pattern("gate", "up") == r"mlp\.(gate_proj|up_proj|gate_up_proj)$"  # every family's
    scheme = named_scheme("w4w2gateup")
    assert [r.pattern for r in scheme.rules if r.config != "keep"] == [before]
    for arch in SPLIT_MLP:
        layout = LAYOUTS[arch]
        assert role_pattern("gate", "up", layouts=[layout]) == before
        applied = scheme.for_layout(layout)
        assert applied is scheme and applied.to_json() == scheme.to_json(), arch
        gate, up, down, q = (f"{layout.layer(0)}.{layout.mlp.module}.{layout.mlp.gate}",
                             f"{layout.layer(0)}.{layout.mlp.module}.{layout.mlp.up}",
                             f"{layout.layer(0)}.{layout.mlp.module}.{layout.mlp.down}", layout.linear_names(0)[0])
        assert [applied.resolve(n).bits for n in (gate, up, down, q)] == [2, 2, 4, 4], arch
    phi3 = scheme.for_layout(LAYOUTS["phi3"])
    assert [r.pattern for r in phi3.rules if r.config != "keep"] == [r"mlp\.(gate_up_proj)$"]
    assert [phi3.resolve(n).bits for n in LAYOUTS["phi3"].linear_names(0)] == [4, 4, 2, 4]  # qkv, o, gate_up, down
    assert scheme.for_layout(None) is scheme
    assert role_pattern("down") == r"mlp\.(down_proj)$"
    assert role_pattern("gate", layouts=[LAYOUTS["llama"], LAYOUTS["phi3"]]) == r"mlp\.(gate_proj)$"  # not half a fused layer
    with pytest.raises(EdgeRecoverError, match="no layer of phi3"):
        role_pattern("up", layouts=[LAYOUTS["phi3"]])
    with pytest.raises(EdgeRecoverError, match="`roles`"):
        role_pattern("q")


@pytest.mark.parametrize("model_type", ["gpt2", "bert", None])
def test_unregistered_refused_in_one_line(model_type):
    with pytest.raises(EdgeRecoverError) as exc:
        layout_for(SimpleNamespace(model_type=model_type, architectures=["XForCausalLM"]))
    msg = str(exc.value)
    assert "\n" not in msg and f"unsupported architecture {model_type!r} (XForCausalLM)" in msg
    assert f"edge-recover supports {NAMES}" in msg and "register a layout" in msg


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3", "gemma3_text"])
def test_gemma_refused_for_its_norm(model_type):
    with pytest.raises(EdgeRecoverError, match=re.escape("RMSNorm scales by 1 + weight")) as exc:
        layout_for(SimpleNamespace(model_type=model_type))
    assert "\n" not in str(exc.value) and NAMES in str(exc.value)


def test_fused_qkv_layout():
    fused = Layout("fusedlm", genai_type="llama", attention=Attention(qkv="qkv_proj"))
    assert fused.linear_names(2)[:2] == ("model.layers.2.self_attn.qkv_proj", "model.layers.2.self_attn.o_proj")
    cfg = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    assert fused.qkv_split(cfg) == (64, 32, 32)


def test_every_allow_list_reads_the_table():
    """Registering a throwaway family makes loading, fused attention and genai_config accept it; unregistering
    it refuses it everywhere again."""
    from edge_recover.exporters.fusions import fused_archs, fusion_plan
    from edge_recover.exporters.genai import genai_config
    from edge_recover.models import check_architecture

    model, _ = make_tiny_model("llama", layers=1)
    cfg = model.config
    before = dict(LAYOUTS)
    assert fused_archs() == FAMILIES
    for family in FAMILIES:
        cfg.model_type = family
        check_architecture(cfg)
        assert fusion_plan(model) == (True, "") and genai_config(cfg)["model"]["type"] == family
    cfg.model_type = "throwaway"
    with pytest.raises(EdgeRecoverError, match="unsupported architecture 'throwaway'"):
        check_architecture(cfg)
    assert not fusion_plan(model)[0] and f"fused: {NAMES}" in fusion_plan(model)[1]
    register(Layout("throwaway", genai_type="phi3", fused_attention=False))
    try:
        check_architecture(cfg)
        assert genai_config(cfg)["model"]["type"] == "phi3"
        assert fused_archs() == FAMILIES and not fusion_plan(model)[0]
        register(Layout("throwaway", genai_type="llama"))
        assert fusion_plan(model) == (True, "") and "throwaway" in fused_archs()
    finally:
        unregister("throwaway")
    assert LAYOUTS == before
    with pytest.raises(EdgeRecoverError, match="unsupported architecture 'throwaway'"):
        genai_config(cfg)


def _save_foreign(path, arch: str):
    """A tiny GPT-2 or Gemma 2 saved with transformers from a config: families with no layout."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config

    from tests.fixtures.tiny_models import make_tokenizer

    tok = make_tokenizer()
    cfg = (GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16, n_positions=32) if arch == "gpt2" else
           Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch, needle", [
    ("gpt2", f"unsupported architecture 'gpt2' (GPT2LMHeadModel); edge-recover supports {NAMES}"),
    ("gemma2", "unsupported architecture 'gemma2' (Gemma2ForCausalLM): Gemma's RMSNorm scales by 1 + weight"),
])
def test_cli_refuses_unregistered_family(tmp_path, arch, needle):
    from tests.fixtures.cli import run_cli

    model = _save_foreign(tmp_path / arch, arch)
    code, out, err = run_cli("quantize", model, "-o", tmp_path / "out", cwd=tmp_path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert NAMES in lines[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [arch]


def test_readme_lists_the_registered_families():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = re.search(r"causal LM \(([^:;]+): the families in sdk/layouts\.py", readme)
    assert listed, "README's first paragraph should list the families of sdk/layouts.py"
    assert tuple(name.strip().lower() for name in listed.group(1).split(",")) == supported()
