"""The programs: what `python -m marval_jax.main --mode=...` runs beyond training (sample, evaluate, demo) and the
Fashion-MNIST pipeline driver (`python -m marval_jax.programs.reproduce`). They sit above the library (models,
sampling, evaluation, losses, train) and import only downward; tools/ and benchmarks/ sit above them."""
