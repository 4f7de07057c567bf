"""The lm_head's bits and block against perplexity: SmolLM2-135M, W4 body (RTN, block 64), torch, on the
peers run's held-out windows (the first 2 x 256 tokens of out/bench/peers/held-out.txt: Hamlet + Macbeth).

    nice .venv/bin/python bench/peers_head.py        # about 3 min on 2 cores; docs/results/peers-smollm2-head.json

The embedding stays float32 here (torch keeps the tied table); in a package with the shared embedding it
reads the head's integers too, so a package's perplexity adds that (bench/peers.py measures packages).
"""

import copy
import json

import torch
from tokenizers import Tokenizer

from edge_recover.apply import quantize_model
from edge_recover.evaluate import evaluate
from edge_recover.fetch import eval_text, fetch_smollm2
from edge_recover.models import load_model
from edge_recover.scheme import load_scheme

HEADS = [("w4 float head b64", []), ("w4 head 4:64", ["lm_head=4:64"]), ("w4 head 4:32", ["lm_head=4:32"]),
         ("w4 head 8:64", ["lm_head=8:64"])]


def main() -> None:
    torch.set_num_threads(2)
    hf = fetch_smollm2()
    lm = load_model(hf)
    ids = Tokenizer.from_file(str(hf / "tokenizer.json")).encode(eval_text(), add_special_tokens=False).ids[:512]
    windows = torch.tensor(ids).view(2, 256)
    res = {"fp32": evaluate(lm.model, windows, progress=False).perplexity}
    for name, rules in HEADS:
        model = copy.deepcopy(lm.model)
        quantize_model(model, load_scheme("w4", rules, "64"), "rtn", progress=False)
        res[name] = evaluate(model, windows, progress=False).perplexity
        print(name, f"{res[name]:.2f}", flush=True)
    meta = {"model": "SmolLM2-135M (fp32 from the Q4_1 GGUF)", "text": "first 2 x 256 held-out tokens (Hamlet + Macbeth)",
            "method": "rtn, body block 64", "embedding": "float32 (torch)", "perplexity": res}
    with open("docs/results/peers-smollm2-head.json", "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
