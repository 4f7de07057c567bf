"""Chat prompts: render a message list with the package's own chat template (tokenizer_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

from edge_recover.errors import EdgeRecoverError

__all__ = ["render_chat"]


def render_chat(package: str | Path, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]) under the package's chat template.

    Example:
        >>> render_chat("out/demo/w4w2gateup", [{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    import jinja2

    cfg_path = Path(package) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    template = cfg.get("chat_template")
    if template is None and (Path(package) / "chat_template.jinja").is_file():
        template = (Path(package) / "chat_template.jinja").read_text()
    if not template:
        raise EdgeRecoverError(f"package {str(package)!r} has no chat template; drop --chat and write the "
                               f"prompt in full")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(EdgeRecoverError(msg))

    def _tok(key: str) -> str:
        value = cfg.get(key)
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=_tok("bos_token"), eos_token=_tok("eos_token"))
