"""`python -m marval_jax.tools.scale_check`: see the package docstring."""
from marval_jax.tools.scale_check.cli import main
from marval_jax.user_errors import run_cli

run_cli(main)
