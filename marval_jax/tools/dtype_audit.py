"""Which dtypes a train step's activations have, and where the float32 ones come from (issue "speed and memory, round
two": activation dtypes audited against PyTorch's bf16 autocast).

    python -m marval_jax.tools.dtype_audit --config=configs/mar.py:base --step=mar --batch=8 [--out=FILE.md]
        [--set model.attention_impl=xla ...]

The step is lowered (not compiled: seconds on a CPU) and its StableHLO read back with source locations. Every op's
result is counted in elements by dtype, and the float32 results are attributed to the innermost marval_jax source
line and to the forward pass, the backward pass or neither (the optimizer update, the loss bookkeeping). Lowered, not compiled, on purpose: XLA's CPU compiler rewrites bfloat16
arithmetic into float32, so a compiled CPU program would show float32 everywhere; the lowered program is what the
model asks every backend for. Ops inside a called function or a loop body count once per definition (a scanned
block stack counts one block); the train steps of the default configs have neither around their blocks.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import sys

from marval_jax.user_errors import UserError, add_verbose_flag, run_cli

STEPS = ("mar", "gsim")
# ops that only name or move data: counted in the dtype totals, left out of the float32 "sites"
MOVES = {"constant", "broadcast_in_dim", "reshape", "iota", "slice", "transpose", "concatenate", "pad", "gather",
         "dynamic_slice", "dynamic_update_slice", "get_tuple_element", "tuple", "bitcast_convert", "reverse"}
_OP = re.compile(r'=\s+"?stablehlo\.([a-z_]+)"?')
_RESULT = re.compile(r'->\s*tensor<([^>]*)>|:\s*tensor<([^>]*)>\s+loc\(')
_LOC_USE = re.compile(r'loc\((#loc\d+)\)\s*$')
_LOC_DEF = re.compile(r'^(#loc\d*) = (.*)$', re.M)
_FILE = re.compile(r'"([^"]+)":(\d+):\d+')
_ELEM = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "i32": 4, "ui32": 4, "i1": 1, "i8": 1, "ui8": 1, "i64": 8}


@dataclasses.dataclass
class Audit:
    elements: dict            # dtype -> elements of all op results
    by_op: dict               # (op, dtype) -> elements
    dots: dict                # "lhs x rhs -> out" dtypes -> (count, output elements)
    f32_sites: dict           # (file:line, pass, op) -> elements of float32 results


def tensor_elements(spec: str) -> tuple[int, str]:
    """'4x64x32xbf16' -> (8192, 'bf16'); a scalar 'f32' -> (1, 'f32')."""
    *dims, dtype = spec.split("x")
    n = 1
    for d in dims:
        if not d.isdigit():   # dynamic or unknown dims: not in our static programs
            raise ValueError(f"non-static tensor type {spec!r}")
        n *= int(d)
    return n, dtype


def _resolver(text: str):
    defs = dict(_LOC_DEF.findall(text))
    memo: dict[str, tuple[str, str]] = {}

    def resolve(ref: str, depth: int = 0) -> tuple[str, str]:
        """(innermost file:line, outermost name) of a location alias."""
        if ref in memo or depth > 200:
            return memo.get(ref, ("?", ""))
        body = defs.get(ref, "")
        where, name = "?", ""
        m = re.match(r'loc\("([^"]*)"\((#loc\d+)\)\)', body)
        if m:   # a named location around another
            name = m.group(1)
            where = resolve(m.group(2), depth + 1)[0]
        elif body.startswith("loc(callsite("):
            callee = re.match(r'loc\(callsite\((#loc\d+) at', body)
            where = resolve(callee.group(1), depth + 1)[0] if callee else "?"
        else:
            f = _FILE.search(body)
            if f:
                where = f"{f.group(1).split('marval_jax/')[-1]}:{f.group(2)}"
        memo[ref] = (where, name)
        return memo[ref]
    return resolve


def audit_text(text: str) -> Audit:
    """Counts the results of every op of a StableHLO module printed with debug info."""
    resolve = _resolver(text)
    elements, by_op = collections.Counter(), collections.Counter()
    dots: dict[str, list] = {}
    sites = collections.Counter()
    for line in text.splitlines():
        op = _OP.search(line)
        if not op or op.group(1) in ("return",):
            continue
        name = op.group(1)
        results = _RESULT.findall(line)
        if not results:
            continue
        spec = results[-1][0] or results[-1][1]
        try:
            n, dtype = tensor_elements(spec)
        except ValueError:
            continue
        elements[dtype] += n
        by_op[(name, dtype)] += n
        if name == "dot_general":
            ins = re.search(r':\s*\(tensor<([^>]*)>,\s*tensor<([^>]*)>\)', line)
            key = (f"{tensor_elements(ins.group(1))[1]} x {tensor_elements(ins.group(2))[1]} -> {dtype}"
                   if ins else f"? -> {dtype}")
            c = dots.setdefault(key, [0, 0])
            c[0] += 1
            c[1] += n
        if dtype == "f32" and name not in MOVES:
            use = _LOC_USE.search(line)
            where, full = resolve(use.group(1)) if use else ("?", "")
            phase = "backward" if "transpose(" in full else "forward" if "jvp(" in full else "outside the gradient"
            sites[(where, phase, name)] += n
    return Audit(dict(elements), dict(by_op), {k: tuple(v) for k, v in dots.items()}, dict(sites))


def lower_step(config_spec: str, step: str, batch: int, sets: list[str] = ()) -> str:
    """The step of `config_spec` (with `sets`: 'key=value' overrides) at global batch `batch`, lowered on one
    device, as StableHLO text with locations."""
    import jax
    from marval_jax.tools.ablate import apply, load_base, set_overrides
    from marval_jax.tools.scale_check.cases import build_case
    if step not in STEPS:
        raise UserError(f"--step: unknown {step!r}; choose one of {', '.join(STEPS)}")
    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    config = load_base(config_spec)
    config = apply(config, set_overrides(config, list(sets)))
    with config.unlocked():
        config.mesh.distributed_init = False
    built = build_case(step, config)
    state = jax.eval_shape(built.init_state, jax.random.PRNGKey(0))
    lowered = jax.jit(built.train_step).lower(state, built.batch_fn(batch), *built.extra)
    return lowered.as_text(debug_info=True)


def report(a: Audit, title: str, top: int = 15) -> str:
    total = sum(n * _ELEM.get(d, 4) for d, n in a.elements.items())
    lines = [f"## {title}", "", "| result dtype | elements | bytes (share) |", "|---|---|---|"]
    for d, n in sorted(a.elements.items(), key=lambda kv: -kv[1]):
        b = n * _ELEM.get(d, 4)
        lines.append(f"| {d} | {n:,} | {b:,} ({b / max(total, 1):.1%}) |")
    lines += ["", "| matmuls (operands -> result) | count | result elements |", "|---|---|---|"]
    for k, (c, n) in sorted(a.dots.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {k} | {c} | {n:,} |")
    f32 = sum(a.f32_sites.values())
    lines += ["", f"Largest float32 results (arithmetic, not data movement; {f32:,} elements in all):", "",
              "| source | pass | op | elements | share |", "|---|---|---|---|---|"]
    for (where, phase, op), n in sorted(a.f32_sites.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {where} | {phase} | {op} | {n:,} | {n / max(f32, 1):.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file and variant, e.g. configs/mar.py:base")
    p.add_argument("--step", default="mar", help=f"one of {', '.join(STEPS)}")
    p.add_argument("--batch", type=int, default=8, help="global batch the step is lowered at (counts scale with it)")
    p.add_argument("--set", action="append", default=[], dest="sets", help="key=value config override (repeat)")
    p.add_argument("--top", type=int, default=15, help="float32 sites listed")
    p.add_argument("--out", default="", help="markdown file (default: stdout)")
    add_verbose_flag(p)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    text = lower_step(a.config, a.step, a.batch, a.sets)
    md = report(audit_text(text), f"{a.config} {a.step} step, batch {a.batch}", a.top)
    if a.out:
        from etils import epath
        epath.Path(a.out).write_text(md)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    run_cli(main)
