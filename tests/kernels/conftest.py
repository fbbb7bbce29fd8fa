"""The kernel tests' float32 tolerances are derived for IEEE float32 products (tests/tolerances.py). On a GPU, XLA's
default float32 matmul is TF32 (a 10-bit mantissa), on both sides of the comparison but with different summation
orders, so there every test here runs at "highest" precision: the float32 cases then test the kernel, not TF32
(measured on an H100, 2026-12-07: 7 float32 cases failed by up to 3.8e-4 against an atol of 1.2e-4). The bfloat16
cases are unaffected (their operands have fewer mantissa bits than TF32)."""
import jax
import pytest


@pytest.fixture(autouse=True)
def _float32_matmuls_in_float32():
    with jax.default_matmul_precision("highest"):
        yield
