"""The Pallas kernels of marval_jax/kernels on the accelerator: their error against the XLA path and their time and
memory beside it, at MAR-B's shapes, in one JSON file that names the card.

    python -m marval_jax.benchmarks.kernel_check --out /tmp/kernels.json            # GPU: the kernels compiled
    python -m marval_jax.benchmarks.kernel_check --quick --out /tmp/k.json          # any backend: interpret mode,
                                                                                     # tiny shapes (the CI smoke run)

Rows (each guarded: a kernel that fails to lower is recorded as status "error" with its message, the rest still run):
- `ln_linear/qkv`, `ln_linear/fc1_gelu`: LayerNorm + Linear (+ bias + GELU) of one block call, tokens x width at
  --batch x 320 x 768 (MAR-B's decoder), the fused kernel against `ln_linear_reference` (what XLA runs today): max
  |difference| over max |reference| (the outputs are bf16: one rounding is 2^-8 of the value), forward time of each.
- `flash/fwd_bwd`: the training attention (dropout 0.1, B x 320 tokens, 12 heads of 64) forward + backward, the
  kernel against its materialising reference with the same dropout bits (error of the output and of dq, dk, dv), and
  the time and compiled temporaries of value_and_grad for: the kernel, the XLA path with jax.random dropout (what
  training runs today) and cuDNN's fused attention without dropout (the speed a dropout-free step could have).
Timings are per call, medians (benchmarks/timing.time_calls); compare them only within one file (one card).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import traceback

import jax
import jax.numpy as jnp
from etils import epath

from marval_jax.benchmarks.timing import compile_timed, time_calls
from marval_jax.kernels.flash_attention import flash_attention, flash_attention_reference
from marval_jax.kernels.fused_linear import ln_linear, ln_linear_reference
from marval_jax.models.transformer import attention_core
from marval_jax.tools.parity import rel_err
from marval_jax.user_errors import UserError, add_verbose_flag, run_cli


def _timed(fn, *args, target_s: float) -> tuple[dict, object]:
    """(time, compile time and temporaries of jit(fn) on args; its output, from the same compiled program)."""
    compiled, info = compile_timed(jax.jit(fn), *args)
    t = time_calls(lambda: compiled(*args), warmup=2, min_reps=5, max_reps=200, target_s=target_s)
    return ({"median_s": t.get("median_s"), "compile_s": info.get("compile_s"),
             "temp_bytes": (info.get("memory") or {}).get("temp_size_in_bytes")}, compiled(*args))


def _guarded(row: dict, measure) -> dict:
    """measure(row) fills the row; an exception is recorded in it (status "error"), so the other rows still run."""
    try:
        measure(row)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one row's failure is a result
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
    print(json.dumps(row), flush=True)
    return row


LN_LINEAR_CASES = (("qkv", 3, None), ("fc1_gelu", 4, "gelu"))   # name, N / width, activation: a block's two pairs


def _ln_linear_args(batch: int, tokens: int, width: int, n: int) -> tuple:
    """(x bf16 (batch, tokens, width), gamma, beta, w (width, n), b): one block's LayerNorm -> Linear operands."""
    keys = jax.random.split(jax.random.key(0), 5)
    return (jax.random.normal(keys[0], (batch, tokens, width), jnp.float32).astype(jnp.bfloat16),
            1.0 + 0.1 * jax.random.normal(keys[1], (width,)), 0.1 * jax.random.normal(keys[2], (width,)),
            jax.random.normal(keys[3], (width, n)) * width ** -0.5, 0.1 * jax.random.normal(keys[4], (n,)))


def ln_linear_rows(batch: int, tokens: int, width: int, interpret: bool, target_s: float) -> list[dict]:
    def measure(n, act):
        def fill(row):
            kw = dict(eps=1e-6, activation=act, dtype=jnp.bfloat16)
            args = _ln_linear_args(batch, tokens, width, n)
            row["kernel"], out_k = _timed(lambda *a: ln_linear(*a, interpret=interpret, **kw), *args,
                                          target_s=target_s)
            row["xla"], out_r = _timed(lambda *a: ln_linear_reference(*a, **kw), *args, target_s=target_s)
            row["rel_err"] = rel_err(out_k, out_r)
        return fill
    return [_guarded({"row": f"ln_linear/{name}", "shape": [batch, tokens, width, mul * width]},
                     measure(mul * width, act)) for name, mul, act in LN_LINEAR_CASES]


SWEEP = {"block_m": (64, 128), "block_n": (64, 128, 256), "block_k": (64, 128), "num_warps": (4, 8),
         "num_stages": (2, 3)}
QUICK_SWEEP = {"block_m": (16,), "block_n": (16, 32), "block_k": (16, 32), "num_warps": (4,), "num_stages": (3,)}


def ln_linear_sweep_rows(batch: int, tokens: int, width: int, interpret: bool, target_s: float,
                         grid: dict) -> list[dict]:
    """The fused kernel's forward time for every combination of `grid` (tile sizes and Triton's warps and stages)
    at the ln_linear rows' shapes, one row each (`ln_linear/<name>/sweep`; a combination that does not compile,
    e.g. one needing more shared memory than the card has, is an "error" row), then `ln_linear/<name>/best`: the
    fastest against the XLA path. Whether any tiling beats XLA's LayerNorm fusion + cuBLAS decides
    `model.kernels`' default (docs/kernels.md)."""
    names, combos = list(grid), list(itertools.product(*grid.values()))
    rows = []
    for name, mul, act in LN_LINEAR_CASES:
        n = mul * width
        args = _ln_linear_args(batch, tokens, width, n)
        kw = dict(eps=1e-6, activation=act, dtype=jnp.bfloat16)
        xla, _ = _timed(lambda *a: ln_linear_reference(*a, **kw), *args, target_s=target_s)
        ok = []
        for combo in combos:
            tiles = dict(zip(names, combo))

            def fill(row, tiles=tiles):
                row["kernel"], _ = _timed(lambda *a: ln_linear(*a, interpret=interpret, **tiles, **kw), *args,
                                          target_s=target_s)
            row = _guarded({"row": f"ln_linear/{name}/sweep", **tiles}, fill)
            rows.append(row)
            if row["status"] == "ok":
                ok.append(row)
        best = min(ok, key=lambda r: r["kernel"]["median_s"]) if ok else None
        rows.append(_guarded({"row": f"ln_linear/{name}/best", "shape": [batch, tokens, width, n]},
                             lambda row, best=best, xla=xla: row.update(
                                 xla=xla, tried=len(combos), compiled=len(ok),
                                 best={k: best[k] for k in names + ["kernel"]} if best else None,
                                 best_over_xla=(best["kernel"]["median_s"] / xla["median_s"]) if best else None)))
    return rows


def flash_rows(batch: int, tokens: int, heads: int, head_dim: int, interpret: bool, target_s: float) -> list[dict]:
    rate = 0.1
    keys = jax.random.split(jax.random.key(1), 4)
    shape = (batch, tokens, heads, head_dim)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16) for kk in keys)
    seed = jnp.int32(1234)

    def value_and_grads(attn):  # <attn(q, k, v), do> and its gradients in q, k, v: one training attention call
        return jax.value_and_grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(
            jnp.float32)), argnums=(0, 1, 2))

    def fill(row):
        kern = lambda q, k, v: flash_attention(q, k, v, dropout_rate=rate, seed=seed, interpret=interpret)  # noqa
        ref = lambda q, k, v: flash_attention_reference(q, k, v, dropout_rate=rate, seed=seed)  # noqa: E731
        row["kernel"], (_, g_k) = _timed(value_and_grads(kern), q, k, v, target_s=target_s)
        row["rel_err_out"] = rel_err(jax.jit(kern)(q, k, v), jax.jit(ref)(q, k, v))
        row["rel_err_grads"] = [rel_err(a, b) for a, b in zip(g_k, jax.jit(value_and_grads(ref))(q, k, v)[1])]
        xla = lambda q, k, v: attention_core(q, k, v, attn_drop=rate, rng=jax.random.key(2), impl="xla")  # noqa
        row["xla_dropout"], _ = _timed(value_and_grads(xla), q, k, v, target_s=target_s)
        if jax.default_backend() == "gpu":
            cudnn = lambda q, k, v: attention_core(q, k, v, impl="cudnn")  # noqa: E731
            row["cudnn_no_dropout"], _ = _timed(value_and_grads(cudnn), q, k, v, target_s=target_s)
    return [_guarded({"row": "flash/fwd_bwd", "shape": list(shape), "dropout": rate}, fill)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write (etils path)")
    p.add_argument("--quick", action="store_true", help="interpret mode, tiny shapes: checks the tool, not the card")
    p.add_argument("--batch", type=int, default=256, help="batch of the ln_linear rows (MAR-B sampling: 256)")
    p.add_argument("--flash-batch", type=int, default=128, help="batch of the flash row (MAR-B training: 128)")
    p.add_argument("--target-s", type=float, default=2.0, help="seconds of repeats per timing")
    p.add_argument("--sweep", action="store_true", help="also time the ln_linear kernel at every tile size, warps "
                   "and stages of SWEEP (QUICK_SWEEP with --quick): rows ln_linear/*/sweep and ln_linear/*/best")
    add_verbose_flag(p)
    a = p.parse_args(argv)
    out = epath.Path(a.out)
    try:  # before any measurement: a run must not end on an unwritable --out
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create its folder ({e})") from e
    interpret = a.quick or jax.default_backend() != "gpu"
    if a.quick:
        lin = ln_linear_rows(2, 20, 32, interpret, 0.05)
        att = flash_rows(2, 20, 2, 16, interpret, 0.05)
        if a.sweep:
            lin += ln_linear_sweep_rows(2, 20, 32, interpret, 0.05, QUICK_SWEEP)
    else:
        lin = ln_linear_rows(a.batch, 320, 768, interpret, a.target_s)
        if a.sweep:
            lin += ln_linear_sweep_rows(a.batch, 320, 768, interpret, min(a.target_s, 0.5), SWEEP)
        att = flash_rows(a.flash_batch, 320, 12, 64, interpret, a.target_s)
    d = jax.devices()[0]
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "device": {"kind": d.device_kind, "platform": d.platform}, "jax": jax.__version__,
              "interpret": interpret, "rows": lin + att}
    if jax.process_index() == 0:  # every process measures its own device; one file
        out.write_text(json.dumps(report, indent=1) + "\n")
    bad = [r["row"] for r in report["rows"] if r["status"] != "ok"]
    print(f"wrote {out}: {len(report['rows'])} rows on {d.device_kind}" + (f", failed: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    run_cli(main)
