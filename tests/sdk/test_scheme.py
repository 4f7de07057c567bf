import json

import pytest

from edge_recover.errors import EdgeRecoverError
from edge_recover.scheme import (KEEP, NAMED_SCHEMES, QuantConfig, Rule, Scheme, load_scheme, named_scheme,
                                 parse_block_sizes, parse_rule)


def test_w4w2gateup_resolution():
    s = named_scheme("w4w2gateup")
    assert s.resolve("model.layers.3.mlp.gate_proj").bits == 2
    assert s.resolve("model.layers.3.mlp.up_proj").bits == 2
    assert s.resolve("model.layers.3.mlp.down_proj").bits == 4
    assert s.resolve("model.layers.3.self_attn.o_proj").bits == 4
    assert s.resolve("lm_head") == KEEP


def test_exact_rule_beats_regex_and_order():
    s = Scheme("t", QuantConfig(4, 32), (Rule(r"mlp", QuantConfig(2, 32)), Rule("model.layers.0.mlp.up_proj", KEEP)))
    assert s.resolve("model.layers.0.mlp.up_proj") == KEEP
    assert s.resolve("model.layers.1.mlp.up_proj").bits == 2
    assert s.resolve("model.layers.1.self_attn.q_proj").bits == 4


@pytest.mark.parametrize("name", list(NAMED_SCHEMES))
def test_json_round_trip(name):
    s = named_scheme(name).with_block_size(64).with_rules([parse_rule("down_proj$=8:128:sym"), parse_rule("q_proj=keep")])
    again = Scheme.from_json(json.loads(s.dumps()))
    assert again == s
    assert again.resolve("model.layers.0.mlp.down_proj") == QuantConfig(8, 128, True)


def test_block_size_per_bit_width():
    s = load_scheme("w4w2gateup", block_size="4:64,2:128")
    assert s.resolve("model.layers.0.mlp.up_proj") == QuantConfig(2, 128)
    assert s.resolve("model.layers.0.mlp.down_proj") == QuantConfig(4, 64)
    only2 = named_scheme("w4w2gateup").with_block_size({2: 128})  # the 4-bit layers keep theirs
    assert only2.resolve("model.layers.0.self_attn.q_proj") == QuantConfig(4, 32)
    assert only2.resolve("model.layers.0.mlp.gate_proj") == QuantConfig(2, 128)
    assert load_scheme("w4", block_size="128").default == QuantConfig(4, 128) == load_scheme("w4", block_size=128).default
    assert Scheme.from_json(json.loads(s.dumps())) == s
    assert load_scheme("w4w2gateup", block_size={4: 64, 2: 128}) == s


@pytest.mark.parametrize("text,match", [
    ("big", "not a number"), ("4:64,2", "must be BITS:BLOCK"), ("3:64", "bits must be one of"),
    ("2:64,2:128", "names 2-bit twice"), ("2:96", "power of two"),
])
def test_bad_block_sizes(text, match):
    with pytest.raises(EdgeRecoverError, match=match):
        parse_block_sizes(text)


def test_load_scheme_from_file(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(named_scheme("w4w2gateup").dumps())
    assert load_scheme(str(f)) == named_scheme("w4w2gateup")
    f.write_text("{not json")
    with pytest.raises(EdgeRecoverError, match="not valid JSON"):
        load_scheme(str(f))


def test_newer_scheme_version_refused():
    d = named_scheme("w4").to_json() | {"format_version": 99}
    with pytest.raises(EdgeRecoverError, match="upgrade edge-recover"):
        Scheme.from_json(d)


@pytest.mark.parametrize("bad,match", [
    (lambda: named_scheme("w3"), "unknown scheme 'w3'"),
    (lambda: QuantConfig(bits=3), "`bits` must be one of"),
    (lambda: QuantConfig(block_size=48), "power of two >= 16"),
    (lambda: QuantConfig(block_size=8), "power of two >= 16"),
    (lambda: parse_rule("gate_proj"), "PATTERN=BITS"),
    (lambda: parse_rule("gate_proj=x"), "must be integers"),
    (lambda: parse_rule("gate_proj=6"), "`bits` must be one of"),
    (lambda: parse_rule("gate(=4"), "not a valid regex"),
])
def test_bad_input_errors(bad, match):
    with pytest.raises(EdgeRecoverError, match=match):
        bad()


def test_rule_that_matches_nothing():
    s = named_scheme("w4").with_rules([parse_rule("gate_prj=2")])
    with pytest.raises(EdgeRecoverError, match="matches no linear layer"):
        s.check_matches(["model.layers.0.mlp.gate_proj"])


def test_target_block_size_replaces_only_stand_in_blocks():
    """A named scheme's blocks and a rule without BLOCK take a target's block; chosen blocks stay."""
    s = load_scheme("w4w2gateup", ["lm_head=4:32", "o_proj=8"]).with_target_block_size(64)
    assert s.resolve("lm_head") == QuantConfig(4, 32)  # `--rule lm_head=4:32`: its own block
    assert s.resolve("model.layers.0.self_attn.o_proj") == QuantConfig(8, 64)  # no BLOCK: the target's
    assert s.resolve("model.layers.0.mlp.gate_proj") == QuantConfig(2, 64)
    assert s.resolve("model.layers.0.mlp.down_proj") == QuantConfig(4, 64)
    chosen = named_scheme("w4w2gateup").with_block_size({2: 128}).with_target_block_size(64)
    assert chosen.resolve("model.layers.0.mlp.up_proj") == QuantConfig(2, 128)  # with_block_size chose it
    assert chosen.resolve("model.layers.0.mlp.down_proj") == QuantConfig(4, 64)
    from_file = Scheme.from_json(named_scheme("w4").to_json())  # a file's blocks are its own
    assert from_file.with_target_block_size(64).default == QuantConfig(4, 32)
    # the stand-in mark is in neither the JSON nor ==: old manifests read and compare as before
    assert from_file == named_scheme("w4") and from_file.to_json() == named_scheme("w4").to_json()
    assert named_scheme("w4").to_json()["default"] == {"bits": 4, "block_size": 32, "symmetric": False}
    assert repr(parse_rule("x=4").config) == "QuantConfig(bits=4, block_size=32, symmetric=False)"
