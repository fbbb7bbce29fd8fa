"""Defaults of the benchmark suite that the command line needs before jax is imported (--quick sets XLA_FLAGS
first), with the estimates behind the batch sizes."""

TRAIN_STEPS = ("mar", "gsim", "rl", "rl_noremat")
WHAT = ("sample", "train", "kv", "breakdown", "block", "remat")
DEFAULT_WHAT = ("sample", "train", "kv", "breakdown")  # block and remat run only when asked for

# The remat/mar/<policy> rows (--what remat): MAR's training step at --train-batch with model.remat_policy = each of
# models/transformer.REMAT_POLICIES (the names repeated here: this module is read before jax is imported), for the
# speed and the compiled program's memory of each.
REMAT_ROWS = ("none", "dots_saveable", "per_block", "full")

# The block/* rows: one transformer block of the model (and its parts) at this batch over the decoder's positions
# (buffer + tokens: 320 for ImageNet-256), each part called BLOCK_CALLS times in one compiled loop (24: the blocks
# of MAR-B's encoder and decoder).
BLOCK_BATCH = 256
BLOCK_CALLS = 24
KV_VARIANTS = ("approx", "causal", "causal_exact")

# The approximate cache policy ("approx", r, R) of the kv/*/approx rows: the tokens generated in the last r = 2 steps
# are recomputed (their keys/values seen again with the newest tokens), older tokens' keys/values are reused, and
# every R = 4th step is a full uncached refresh (16 of the 64 steps). docs/kv_cache.md fixes no values; --kv-approx
# changes them.
KV_APPROX = (2, 4)

# Encoder-length buckets of every AR loop, the samplers' and the RL step's (as configs/common.py's
# sample.num_buckets): one compiled loop body per bucket. --num-buckets changes it (docs/benchmarks.md, "Compile time
# on the CPU").
NUM_BUCKETS = 4

# Default GSIM batch: one generator + one fake-score update on three MAR-B copies (208M parameters each). State:
# generator and fake score with their AdamW moments, the frozen teacher: 5.8 GB of arguments (XLA's count), plus
# two f32 gradients (1.7 GB). Activations kept for the backward passes, per example (bf16 compute, no remat): the
# trained transformer pass at the training encoder length 140 and the decoder's 320 positions (per block ~16
# width-768 tensors plus the f32 and bf16 attention probabilities, 12 x 320^2 each, and f32 LayerNorm values) and
# the heads' rows. XLA's buffer assignment of the compiled step (CPU, memory_analysis) grows by 1.40 GB per example
# (temporaries 4.42 GB at batch 2, 7.22 GB at batch 4): batch 64 needs ~97 GB (90 GiB) with the arguments, inside
# one H200's 139 GiB (and inside XLA's default 75% pool, 105 GiB); batch 128 (~187 GB) and the old default 256 would
# not fit. An out-of-memory failure would still give a number: the step is retried at half the batch.
GSIM_BATCH = 64

# Default RL batch (train/rl and train/rl_noremat run at the same batch). With rl.remat off the backward pass keeps
# every AR iteration's activations: 64 iterations x 24 blocks x 320 positions x 768 width in bf16 is 0.75 GB for
# each width-768 tensor a block keeps; a block keeps the equivalent of ~35-40 of them (LayerNorm values in f32, q/k/v
# and the attention output, fc1 output and GELU input at 4x width, and the attention probabilities in f32 for the
# softmax backward plus bf16 for p.v: 12 x 320^2 per block, 3.8 widths' worth), the encoder running at its bucket
# lengths (30 steps at 128, 13 at 192, 11 at 256, 10 at 320). Counted exactly, the residuals JAX stacks across the
# AR loop's scans come to 29.6 GB per example (jaxpr of the step at batch 1); XLA's buffer assignment of the compiled
# step on CPU grows by 46 GB per example (temporaries 50.3 GB at batch 1, 96.5 GB at batch 2: copies of the stacked
# residuals between the forward and backward loops). So 30-46 GB (28-43 GiB) per example: batch 2 (60-92 GB + 2.5 GB
# of state) fits one H200 (139 GiB; 126 GiB with XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 as launch/gpu_bench.sh sets),
# batch 4 (120-185 GB) likely would not, and 16 (~0.5-0.7 TB) certainly not. With rl.remat on only the carried tokens
# (256 x 16 f32 per example) are kept per iteration, plus one iteration's activations while it is recomputed.
RL_BATCH = 2
