"""The benchmark suite: samplers, training steps and a time breakdown of the samplers, on whatever device JAX finds.

Each measurement becomes one result dict (see `Suite.record`); the JSON file is rewritten after every result, so a
run cut short keeps what it measured. Models use random weights (`random_state`: every parameter N(0, 0.02^2),
LayerNorm scales 1 + N(0, 0.02^2), drawn on the host leaf by leaf, so no initialiser is compiled and no layer is
zero), bfloat16 compute and float32 parameters.

Measurements (per model):
  sample/teacher   MAR's sampler: 64 AR iterations, CFG (2.9 linear for MAR-B) fused into 2B rows, the head's
                   respaced reverse chain (100 steps) with CFG inside, temperature 1.
  sample/onestep   MARVAL's sampler: 64 AR iterations, one head call at t_init = 760 per token, no CFG.
  train/mar        MAR's training step (mar_loss with dropout and label drop, AdamW with the reference decay set,
                   clip 3.0, EMA), batch 256, jitted with the state donated.
  train/gsim       one generator update + one fake-score update (marval_jax.losses.gsim, default settings:
                   teacher CFG 1.2, pseudo-Huber), three MAR states (teacher frozen).
  train/rl         the RL loss (marval_jax.losses.rl) backpropagated through the one-step generator's 64-iteration
                   AR loop (rl.remat on: jax.checkpoint per AR iteration, all iterations carry gradient); the tokenizer
                   decode and the reward model are replaced by a reshape and a closed-form reward, so only the
                   generator is timed.
  train/rl_noremat the same step with rl.remat off (every iteration's activations kept for the backward pass), at the
                   same batch; an out-of-memory failure is recorded as status "oom" and the step is retried at half
                   the batch (down to 1), then train/rl is measured again at the batch that fitted.
  kv/<s>/approx    the KV-cached sampler (marval_jax.sampling.cached_sampler) of the bidirectional model with the
                   approximate policy ("approx", r, R); speed-up against sample/<s> at the same batch.
  kv/<s>/causal    the uncached sampler of the same weights with attention="causal" (the exact cache's reference).
  kv/<s>/causal_exact  the exact KV-cached sampler (attention="causal"); speed-up against kv/<s>/causal.
  breakdown/*      the sampler with the predictor replaced by a slice of z (transformer passes + token gathers and
                   scatters of the AR loop) and the predictor calls alone on fixed conditions (head loop), each one
                   compiled loop over the same segments, so that transformer + head + rest = sampler.
  block/*          (--what block only) one decoder block of the model at --block-batch over the decoder's positions
                   (buffer + tokens, 320 for ImageNet-256), and its parts: full (Block with the model's
                   attention_impl, "auto": cuDNN's fused attention on GPU in bf16, and kernels), full_xla (the same Block
                   with attention_impl and kernels "xla": the reference's unfused block), attention (norm1 + Attention +
                   residual), attention_core (q k^T in f32, softmax, p v: transformer.attention_core),
                   attention_core_dpa (the same through jax.nn.dot_product_attention, cuDNN on GPU), matmuls (qkv,
                   proj, fc1, fc2 alone), mlp (norm2 + Mlp + residual); each part called --block-calls (24) times in
                   one compiled fori_loop with its output fed back.

Layout: `runner` (`Settings`, `Suite`: the rows in priority order, the time budget, out-of-memory retries, the JSON
rewritten after every row; `main_run`), `model_bench` (the model configurations, random weights and `ModelBench`,
which builds and times each row's program), `report` (the markdown tables, `merge_reports`, `write_table`). Every
name is re-exported here, so `marval_jax.benchmarks.suite.X` keeps working.
"""
from marval_jax.benchmarks.model_bench import (  # noqa: F401
    IMAGENET, MARGIN_S, REMAT, SAMPLE_CFG, SIZES, TINY, ModelBench, _train_namespace, copy_tree, model_config,
    random_state,)
from marval_jax.benchmarks.report import (  # noqa: F401
    BEGIN, COMPILE_TARGET_S, END, PYTORCH_REF, TARGETS, TRAIN_LABELS, _alloc_gib, _fmt, _gib, _json_default,
    _same_run_row, _short_error, _short_oom, _status, _target, merge_reports, render_markdown, write_table,)
from marval_jax.benchmarks.runner import (  # noqa: F401
    ASSUMED_MFU, COMPILE_GUESS_S, CPU_FLOPS, MATMUL_REF_TFLOPS, PEAK_TFLOPS, PREDICT_SLACK, Settings, Suite,
    _device_info, _lookup, _versions, device_slug, is_oom, main_run, row_names,)
