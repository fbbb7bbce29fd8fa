"""tools/dtype_audit.py: the counts read from a lowered step's StableHLO (elements by dtype, matmul dtypes, the
source line and pass of each float32 result)."""
import pytest

from marval_jax.tools import dtype_audit
from marval_jax.user_errors import UserError

# a StableHLO excerpt in the form jax prints with debug_info=True: a bf16 matmul with a float32 result in the
# forward pass (its location a callsite whose callee is models/x.py:7), a float32 multiply in the backward pass,
# a bf16 add outside the gradient, and a float32 broadcast (data movement: counted, not listed as a site)
MODULE = '''
    %1 = stablehlo.dot_general %a, %b, contracting_dims = [2] x [0] : (tensor<4x8x16xbf16>, tensor<16x32xbf16>) -> tensor<4x8x32xf32> loc(#loc10)
    %2 = stablehlo.multiply %1, %1 : tensor<4x8x32xf32> loc(#loc11)
    %3 = stablehlo.add %c, %c : tensor<3x5xbf16> loc(#loc12)
    %4 = stablehlo.broadcast_in_dim %d, dims = [] : (tensor<f32>) -> tensor<2x2xf32> loc(#loc12)
    %5 = "stablehlo.exponential"(%e) : (tensor<7xf32>) -> tensor<7xf32> loc(#loc13)
#loc1 = loc("/src/marval_jax/models/x.py":7:4 to :20)
#loc2 = loc("/src/marval_jax/train/y.py":12:8)
#loc3 = loc("MAR.block"(#loc1))
#loc4 = loc(callsite(#loc3 at #loc2))
#loc10 = loc("jit(step)/jvp()/dot_general"(#loc4))
#loc11 = loc("jit(step)/transpose(jvp())/mul"(#loc4))
#loc12 = loc("jit(step)/add"(#loc2))
#loc13 = loc("jit(step)/exp"(#loc2))
'''


def test_counts_dtypes_matmuls_and_float32_sites_of_a_module():
    a = dtype_audit.audit_text(MODULE)
    assert a.elements == {"f32": 2 * 4 * 8 * 32 + 4 + 7, "bf16": 15}
    assert a.dots == {"bf16 x bf16 -> f32": (1, 4 * 8 * 32)}
    assert a.f32_sites == {("models/x.py:7", "forward", "dot_general"): 1024,
                           ("models/x.py:7", "backward", "multiply"): 1024,
                           ("train/y.py:12", "outside the gradient", "exponential"): 7}
    md = dtype_audit.report(a, "t")
    assert "| bf16 x bf16 -> f32 | 1 | 1,024 |" in md and "| models/x.py:7 | backward | multiply | 1,024 |" in md


def test_tensor_elements():
    assert dtype_audit.tensor_elements("4x64x32xbf16") == (8192, "bf16")
    assert dtype_audit.tensor_elements("f32") == (1, "f32")
    with pytest.raises(ValueError):
        dtype_audit.tensor_elements("?x4xf32")


def test_tiny_mar_step_asks_bf16_matmuls_only_when_the_model_is_bf16(tmp_path):
    """The tiny config is float32 (every matmul f32); set to bfloat16, its matmuls take bf16 operands and its GELU
    (models/transformer.py gelu_erf) is computed in float32, as autocast's GELU kernel does."""
    out = tmp_path / "audit.md"
    assert dtype_audit.main(["--config=configs/mar.py:tiny", "--step=mar", "--batch=2", f"--out={out}"]) == 0
    md = out.read_text()
    assert "| f32 x f32 -> f32 |" in md and "bf16" not in md
    bf = dtype_audit.audit_text(dtype_audit.lower_step("configs/mar.py:tiny", "mar", 2, ["model.dtype=bfloat16"]))
    bf16_dots = sum(c for k, (c, _) in bf.dots.items() if k.startswith("bf16 x bf16"))
    assert bf16_dots > sum(c for k, (c, _) in bf.dots.items() if k.startswith("f32 x f32"))
    assert any(w.startswith("models/transformer.py") for (w, _, _) in bf.f32_sites)
    with pytest.raises(UserError, match="--step"):
        dtype_audit.lower_step("configs/mar.py:tiny", "rl", 2)
    with pytest.raises(UserError, match="model.dtyp"):
        dtype_audit.lower_step("configs/mar.py:tiny", "mar", 2, ["model.dtyp=bfloat16"])
