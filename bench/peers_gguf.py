"""llama.cpp's side of the peers race for a model that ships as a GGUF file (issue 28: Qwen2.5-Coder).

For a model such as `qwen2.5-coder-1.5b` the GGUF it ships as *is* what a llama.cpp user runs, so the race
takes that file as it is (`llama.cpp-Q4_K_M-shipped`) and adds files made from it by llama.cpp's own
quantizer (`llama_model_quantize` through llama-cpp-python's low-level API):

    shipped GGUF (Q4_K_M) --llama_model_quantize(ALL_F32, allow_requantize)--> F32 GGUF (the same values)
                                                                                  |
                     imatrix (below) -----------------------------------------+   |  llama_model_quantize(KIND)
                                                                              v   v
                                                                    llama.cpp-Q4_0, -Q2_K, -IQ2_M, ...

The F32 file holds exactly the shipped weights (dequantization is exact in float32), so every requantized
file is quantized once more from the same values our packages are quantized from (edge-recover dequantizes
the same GGUF), never from Qwen's bf16 originals, which are not on this machine.

IQ2/IQ1 types (and IQ3_XXS, Q2_K_S) are refused by llama.cpp's quantizer without an importance matrix
("the result will be garbage"), so those get one, computed the way llama.cpp's `llama-imatrix` tool does:
a `cb_eval` callback on the shipped model sees the input of every weight matmul and keeps the mean of x^2
per input column; llama-cpp-python 0.3.36 passes it to the quantizer as `llama_model_imatrix_data` rows.
The calibration text is Shakespeare's plays other than the held-out Hamlet and Macbeth (peers.py).

This file is also a plain script for the interpreter that has llama-cpp-python (numpy and the standard
library only, like runtimes/worker.py):

    .venv-llama/bin/python bench/peers_gguf.py quantize SRC.gguf DST.gguf Q2_K [--imatrix IM.npz] [--requantize]
    .venv-llama/bin/python bench/peers_gguf.py imatrix MODEL.gguf IDS.npy IM.npz [--threads N]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# llama.cpp's LLAMA_FTYPE_* values (include/llama.h of llama-cpp-python 0.3.36's vendor tree)
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
          "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
          "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25,
          "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31}
# file types whose tensors llama.cpp refuses to quantize without an importance matrix (llama-quant.cpp,
# tensor_requires_imatrix: IQ1_S/M, IQ2_XXS/XS/S, IQ3_XXS, and Q2_K inside a Q2_K_S file)
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})
SHIPPED = "shipped"


@dataclass(frozen=True)
class GgufEntry:
    """One llama.cpp entry of the race: `path` is the shipped file itself or a file made from the F32 copy."""

    label: str
    kind: str            # the llama.cpp file type, e.g. Q4_K_M
    path: Path
    shipped: bool        # the model's own file, run as it is
    imatrix: bool        # made with an importance matrix


def file_kind(path: Path) -> str:
    """The llama.cpp file type a GGUF's header names (`general.file_type`), e.g. `Q4_K_M`.

    Example:
        >>> file_kind(Path("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"))  # doctest: +SKIP
        'Q4_K_M'
    """
    import gguf

    field = gguf.GGUFReader(str(path)).get_field("general.file_type")
    if field is None:
        return "unknown"
    return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def plan(source: Path, name: str, kinds: list[str], work: Path, shipped_kind: str) -> list[GgufEntry]:
    """The llama.cpp entries for `kinds` (`shipped` = `source` as it is, else a llama.cpp file type made from
    the F32 copy of `source`), in the order given; files of made entries go to `work/NAME-KIND.gguf`.

    Example:
        >>> [e.label for e in plan(Path("m.gguf"), "m", ["shipped", "Q4_0", "IQ2_M"], Path("w"), "Q4_K_M")]
        ['llama.cpp-Q4_K_M-shipped', 'llama.cpp-Q4_0', 'llama.cpp-IQ2_M']
    """
    out = []
    for kind in kinds:
        if kind == SHIPPED:
            out.append(GgufEntry(f"llama.cpp-{shipped_kind}-shipped", shipped_kind, source, True, False))
        elif kind in FTYPES and kind not in ("F32", "F16"):
            out.append(GgufEntry(f"llama.cpp-{kind}", kind, work / f"{name}-{kind}.gguf", False, kind in NEEDS_IMATRIX))
        else:
            raise ValueError(f"`--gguf` names {kind!r}, which is neither `{SHIPPED}` nor a llama.cpp quantized file "
                             f"type; pass some of: {SHIPPED}, {', '.join(k for k in FTYPES if k not in ('F32', 'F16'))}")
    if len({e.label for e in out}) < len(out):
        raise ValueError(f"`--gguf` names an entry twice: {','.join(kinds)}")
    return out


def calibration_chunks(ids: list[int], chunks: int, ctx: int) -> np.ndarray:
    """`chunks` windows of `ctx` ids spread evenly over `ids` (so several plays, not the first one only):
    int32 [chunks, ctx].

    Example:
        >>> calibration_chunks(list(range(100)), 3, 10)[:, 0].tolist()
        [0, 45, 90]
    """
    if len(ids) < chunks * ctx:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than {chunks} x {ctx}; "
                         f"lower `--imatrix-chunks`")
    starts = np.linspace(0, len(ids) - ctx, chunks).astype(np.int64)
    a = np.asarray(ids, dtype=np.int32)
    return np.stack([a[s:s + ctx] for s in starts])


class ImatrixStats:
    """Sums of x^2 per input column of every weight, and how many rows (tokens) went in: what
    llama-imatrix keeps (`collect_imatrix`, dense case). `means()` is what its quantizer reads."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, x: np.ndarray) -> None:
        """`x` [rows, K]: the activations multiplied by weight `name` (K = its input columns)."""
        acc = self.sums.setdefault(name, np.zeros(x.shape[-1], np.float64))
        if acc.shape[0] != x.shape[-1]:
            raise ValueError(f"inconsistent input size for {name}: {acc.shape[0]} vs {x.shape[-1]}")
        acc += np.square(x, dtype=np.float64).sum(axis=0)
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def means(self) -> dict[str, np.ndarray]:
        return {k: (v / self.counts[k]).astype(np.float32) for k, v in self.sums.items()}


def _weight_name(name: str) -> str:
    """`CPU#blk.0.attn_q.weight#0` (a scheduler copy) -> `blk.0.attn_q.weight`, as llama-imatrix does."""
    parts = name.split("#")
    return parts[1] if len(parts) > 1 else name


# ---------------------------------------------------------------------------------------------------------------
# The script side: runs under the interpreter with llama-cpp-python (never imported by edge-recover's venv).

class _Tensor(ctypes.Structure):
    pass


_Tensor._fields_ = [  # struct ggml_tensor (ggml/include/ggml.h): GGML_MAX_DIMS 4, MAX_OP_PARAMS 64, MAX_SRC 10
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_Tensor) * 10), ("view_src", ctypes.POINTER(_Tensor)), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml_op(llama_cpp, op_name: str) -> int:
    """The enum value of a ggml op, read from the library itself (`ggml_op_name`), not assumed."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    base = next((p for p in sorted(lib_dir.glob("libggml-base*")) if ".so" in p.name or p.suffix == ".dylib"), None)
    lib = ctypes.CDLL(str(base)) if base else llama_cpp.llama_cpp._lib
    lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    for i in range(200):
        if lib.ggml_op_name(i) == op_name.encode():
            return i
    raise RuntimeError(f"ggml has no op {op_name}")


def compute_imatrix(model: str, ids: np.ndarray, out: str, threads: int) -> None:
    """Run `ids` [chunks, ctx] through `model` by llama.cpp and write the per-column mean of x^2 of every
    `blk.*` weight's input to `out` (.npz, names as in the GGUF)."""
    import llama_cpp

    mul_mat = _ggml_op(llama_cpp, "MUL_MAT")
    stats, errors = ImatrixStats(), []

    def collect(t_ptr, ask, _user):
        try:
            t = _Tensor.from_address(t_ptr)
            if t.op != mul_mat or not t.src[0] or not t.src[1]:
                return False if ask else True
            w, x = t.src[0].contents, t.src[1].contents
            name = _weight_name(w.name.decode(errors="replace"))
            if ask:  # F32 activations of a model weight, a batch of 16+ rows (llama-imatrix's rule)
                return name.startswith("blk.") and x.type == 0 and x.ne[1] >= 16
            k, rows, nb = int(x.ne[0]), int(x.ne[1]), [int(v) for v in x.nb]
            for i3 in range(int(x.ne[3])):
                for i2 in range(int(x.ne[2])):
                    buf = (ctypes.c_char * ((rows - 1) * nb[1] + 4 * k)).from_address(x.data + i2 * nb[2] + i3 * nb[3])
                    stats.add(name, np.ndarray((rows, k), np.float32, buf, 0, (nb[1], nb[0])))
            return True
        except Exception as e:  # an exception must not cross into C: stop the computation instead
            errors.append(repr(e))
            return False

    callback = llama_cpp.ggml_backend_sched_eval_callback(collect)
    mp = llama_cpp.llama_model_default_params()
    m = llama_cpp.llama_model_load_from_file(model.encode(), mp)
    if not m:
        raise RuntimeError(f"llama.cpp could not load {model}")
    cp = llama_cpp.llama_context_default_params()
    n = int(ids.shape[1])
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = n, n, n, threads, threads
    cp.cb_eval, cp.cb_eval_user_data = callback, None
    ctx = llama_cpp.llama_init_from_model(m, cp)
    # logits for every position, as llama-imatrix asks: with the last one only, llama.cpp drops the other rows
    # before the last layer's MLP, whose weights would then see a single row and get no importance
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        for i, row in enumerate(ids):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            batch.n_tokens = n
            for j, tok in enumerate(row.tolist()):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = tok, j, 1, True
                batch.seq_id[j][0] = 0
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0 or errors:
                raise RuntimeError(f"llama_decode of chunk {i} returned {rc}: {'; '.join(errors[:3])}")
            if (i + 1) % 8 == 0 or i + 1 == len(ids):
                print(f"imatrix: chunk {i + 1}/{len(ids)}, {len(stats.sums)} weights", file=sys.stderr, flush=True)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(m)
    if not stats.sums:
        raise RuntimeError("no weight matmul was seen: the ggml_tensor layout or the op id does not match this build")
    short = [k for k, c in stats.counts.items() if c < ids.size]
    if short:  # every weight must see every calibration row, as in llama-imatrix
        raise RuntimeError(f"{len(short)} weights saw fewer than {ids.size} rows, e.g. {short[0]}")
    np.savez(out, **stats.means())


class _ImatrixRow(ctypes.Structure):  # struct llama_model_imatrix_data
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.POINTER(ctypes.c_float)), ("size", ctypes.c_size_t)]


def quantize(src: str, dst: str, kind: str, imatrix: str | None, requantize: bool, threads: int) -> int:
    """llama.cpp's `llama_model_quantize(src -> dst, kind)`; returns its status (0 = done)."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.allow_requantize = FTYPES[kind], threads, requantize
    keep = []  # the arrays must outlive the call
    if imatrix:
        data = np.load(imatrix)
        row = getattr(llama_cpp, "llama_model_imatrix_data", _ImatrixRow)  # the binding's own, where it has one
        rows = (row * (len(data.files) + 1))()  # the last row's name NULL ends the list
        for i, name in enumerate(data.files):
            v = np.ascontiguousarray(data[name], dtype=np.float32)
            keep.append((name.encode(), v))
            rows[i] = row(keep[-1][0], v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size)
        p.imatrix = ctypes.cast(rows, ctypes.POINTER(row))
        keep.append(rows)
    return int(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)))


def main() -> None:
    ap = argparse.ArgumentParser(description="llama.cpp's quantizer and importance matrix, for bench/peers.py")
    sub = ap.add_subparsers(dest="op", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("kind", choices=sorted(FTYPES))
    q.add_argument("--imatrix")
    q.add_argument("--requantize", action="store_true", help="allow a quantized source (dequantized first)")
    q.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    im = sub.add_parser("imatrix")
    im.add_argument("model")
    im.add_argument("ids", help=".npy of int32 [chunks, ctx] token ids")
    im.add_argument("out", help=".npz to write")
    im.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    import logging

    import llama_cpp._logger  # noqa: F401  (installs llama-cpp-python's log callback, which reads this level)

    logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)  # llama.cpp's warnings, not its per-tensor info
    if a.op == "quantize":
        rc = quantize(a.src, a.dst, a.kind, a.imatrix, a.requantize, a.threads)
        if rc == 0:
            print(f"llama.cpp {a.kind}: {Path(a.dst).stat().st_size / 1e6:.1f} MB", file=sys.stderr)
        sys.exit(rc)
    compute_imatrix(a.model, np.load(a.ids), a.out, a.threads)


if __name__ == "__main__":
    main()
