"""Scale check: per-device memory of the compiled MAR / GSIM / RL train steps on a simulated mesh of N devices.

    python -m marval_jax.tools.scale_check --devices 64,256 --models base,large,huge \
        --steps mar,mar_fix,gsim,rl --mesh data=-1,fsdp=16,tensor=1 --batches 2,4 \
        --hbm v5p=95,v5e=16,v4=32,h200=141 --out docs/scale.md --date 2026-11-29

Nothing is allocated and nothing runs: per (device count, model, step) a subprocess forces N CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, set before jax is imported), builds the real task from the
config (configs/mar.py, configs/marval.py, configs/marval_rl.py), takes the state's shapes with `jax.eval_shape`,
its shardings with `marval_jax.train.loop.state_shardings` (the config's logical axis rules on the mesh), and
lowers and compiles the train step exactly as the loop jits it (`in_shardings=(state, batch)`,
`out_shardings=(state, None)`, `donate_argnums=0`) on `ShapeDtypeStruct`s at two per-device batch sizes. It reads
`compiled.memory_analysis()` (sizes per device of the SPMD-partitioned program) and splits the state into
params / optimizer / EMA / frozen copies from the shardings directly.

Memory model (stated in the report): peak(b) = arguments + outputs - aliased (donated) + temporaries, measured at
two per-device batch sizes b1 < b2 and fitted as peak(b) = fixed + b * per_example. The largest per-device batch
that fits an HBM size H is floor((fraction * H - fixed) / per_example) (fraction = --hbm_fraction).

Results of every case are cached in --cache (JSON, keyed by devices / mesh / model / step / batches, stamped with the
commit they were compiled at), so a rerun only compiles what is missing (--recompile: all of its cases); the cache
also records each command and its cases, and --out renders every recorded command's cases as the markdown report
(docs/scale.md).

Validation on a real device (`--execute`; docs/scale.md, section `H200 validation`): on one accelerator, build the
same case with random state (shapes from `jax.eval_shape(init_state)`, each leaf made on its own onto its sharding by
`marval_jax.benchmarks.random_init`: no initialiser is compiled), run a few steps on a fixed random batch and compare
the allocator's peak with the cached N = 1 CPU prediction; the JSON (default `scale_execute_<model>_<step>_b<b>.json`)
is written before the compile and after every phase. `--record FILE` adds the result to the report, also a run cut
short after its compile (its compiled peak is compared, the executed peak marked as not measured, `--note` says why).
`--device_probes 8,16` first compiles the step on the device at those batches (not run): the device-compiled
prediction of the executed batch's peak, since the CPU compiler holds bf16 activations at f32 size (docs/scale.md):

    python -m marval_jax.tools.scale_check --execute --devices 1 --models base --steps gsim \
        --mesh data=1,fsdp=1,tensor=1 --batches 8,16 --execute_batch 32 --device_probes 8,16 --execute_steps 3 \
        --compile_options xla_gpu_autotune_level=0 --out $OUT/h200_gsim.json
    python -m marval_jax.tools.scale_check --record $OUT/h200_gsim.json --out docs/scale.md

Each compiled program is also checked for batch sharding: the report flags a step whose arrays lead with the
global batch rather than the per-device batch (every device would compute the whole batch).

Steps: `mar` (configs/mar.py, mar_task.build_step), `mar_fix` (recorded runs of a diffusion-row layout that is now
`losses/mar_loss.diffusion_loss` itself: today the same step as `mar`), `gsim` (configs/marval.py,
distill_task.build_step: generator + fake score, each trained role with Adam moments and EMA, and the frozen teacher
as the step's input, sharded like the state), `rl` (configs/marval_rl.py, rl_task.build_step's train step with
rl.remat on and off). Every case is the task's own pure step (`build_step(config)`, no file read, nothing patched)
with its frozen inputs as abstract shapes (`abstract_frozen`) placed as the training loop places them. The RL
step's frozen reward (PickScore, CLIP ViT-H/14: `abstract_clip_reward`) and VAE decoder parameters are replicated
arguments (abstract, random-weight shapes of the real sizes: no converted checkpoint is needed), as the registry
recommends for CLIP-H size rewards.
TPU (`--target=tpu --topology=v5e:16x16`, module `tpu`): the same cases plus the one-step sampler compiled by the
TPU compiler itself, ahead of time on this CPU machine (libtpu from the `tpu-aot` extra, a slice described offline,
no TPU), per-chip memory against the chip's HBM, the compiler's FLOPs beside benchmarks/flops.py's and the roofline
step time (a prediction); each case is appended to a JSON (`--json docs/scale_tpu.json`) and rendered into its own
block of docs/scale.md. `--target=cpu` (the default) and `--target=gpu` (`--execute` / `--device_probes`) are the
forced-CPU tool described above.

Layout: `cases` (parsing, building and compiling one case), `measurement` (the fit, `--execute`, the worker
subprocesses and the cache), `report` (docs/scale.md), `cli` (`main`), `tpu` (`--target=tpu`; imported only for
it); every name but `tpu`'s is re-exported here.
"""
from marval_jax.tools.scale_check.cases import (  # noqa: F401
    _root, HBM_DEFAULT, STEPS, CONFIG_FILES, GB, VIT_H_14, parse_mesh, parse_hbm, parse_options, parse_list, case_key,
    _state_breakdown, _leading_dims, _tree_bytes_per_device, load_config, Built, abstract_clip_reward,
    build_case, _build_rl, _nbytes, run_case,)
from marval_jax.tools.scale_check.measurement import (  # noqa: F401
    _outside_steps, _commit, _memory_analysis, _memory_stats, find_prediction, _write_json, execute_case,
    device_prediction, _frozen_input_rule, executed_steps, measured_key, not_executed_reason, execute_summary, fit,
    max_batch, _worker_main, _spawn, _command_key, _save_cache, _execute_main, default_execute_out,)
from marval_jax.tools.scale_check.report import (  # noqa: F401
    _gb, _frozen_args, _step_label, LEGACY, H200_COMMAND, RECORD_COMMAND, _code, _commands_block, render, _cpu_cases,
    _cpu_case, _cpu_probe, _device_name, _device_compiled_runs, _device_row_label, _device_allocator_diff,
    _device_compiled_row, _cpu_vs_device, _range, _device_rows_intro, _validation_summary, _pct, _validation_notes,
    _validation_section, _findings, _error_findings,)
from marval_jax.tools.scale_check.cli import (  # noqa: F401
    main,)
