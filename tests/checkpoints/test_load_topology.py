"""A run workdir's checkpoint loads into the current layout, whatever mesh / device count it was saved under.

The tiny teacher (saved by this process, whose device count is whatever the suite runs with, usually 1) is
re-saved by a subprocess with 8 forced CPU devices, every leaf sharded over all 8 (the layout of a 1 process x 8
devices run); that subprocess also loads the original into an 8-way layout. This process then loads the 8-device
checkpoint onto its own devices. Values must be bit-identical (a restore copies bytes, no arithmetic).
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from marval_jax.checkpoints import manager as ckpt
from marval_jax.checkpoints.load import load_model_params
from marval_jax.models.mar import MARConfig
from marval_jax.models.factory import abstract_model

RESAVE = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flax import nnx
    from marval_jax.checkpoints import manager as ckpt
    from marval_jax.checkpoints.load import load_model_params
    from marval_jax.models.mar import MARConfig
    from marval_jax.models.factory import abstract_model
    src, dst = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8, jax.device_count()
    mesh = Mesh(np.asarray(jax.devices()), ("fsdp",))
    def spec(x):  # shard the largest axis that 8 divides (as FSDP does), else replicate
        axes = [i for i in np.argsort(x.shape)[::-1] if x.shape[i] % 8 == 0]
        parts = [None] * x.ndim
        if axes:
            parts[axes[0]] = "fsdp"
        return NamedSharding(mesh, P(*parts))
    manager = ckpt.make_manager(src, save_interval=1, keep=10, async_save=False)
    step = manager.latest_step()
    cfg_json = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    sharded = jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), spec(np.asarray(x))), raw)
    n_split = sum(len(set(str(s.index) for s in x.addressable_shards)) > 1 for x in jax.tree_util.tree_leaves(sharded))
    out = ckpt.make_manager(dst, save_interval=1, keep=10, async_save=False)
    ckpt.save(out, step + 1, sharded, None, cfg_json, force=True)
    out.wait_until_finished()
    # the other direction: the checkpoint saved by the test process, into an 8-way layout
    model = MARConfig.from_dict(cfg_json["model"])
    _, abstract = abstract_model(model)
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec(x)), abstract)
    params = load_model_params(src, target, cfg_json["model"])
    ok = all(x.sharding == t.sharding for x, t in zip(jax.tree_util.tree_leaves(params),
                                                       jax.tree_util.tree_leaves(target)))
    flat = {"|".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in k): np.asarray(v) for k, v in
            jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]}
    np.savez(sys.argv[3], **flat)
    print(json.dumps({"n_split": int(n_split), "shardings_match": bool(ok)}))
""")


def _flat(params):
    return {"|".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]}


def test_checkpoint_of_another_topology_restores_on_the_current_layout(tiny_teacher, tmp_path):
    manager = ckpt.make_manager(tiny_teacher, save_interval=1, keep=10, async_save=False)
    step = manager.latest_step()
    model_cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]["model"]
    _, abstract = abstract_model(MARConfig.from_dict(model_cfg))
    expected = _flat(load_model_params(tiny_teacher, abstract, model_cfg))
    raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    raw_ema = raw["ema_params"]
    assert sorted(expected) and any(np.any(v != 0) for v in expected.values())
    # use_ema=False reads the trained (non-EMA) params, which differ from the EMA weights after 2 steps
    plain = _flat(load_model_params(tiny_teacher, abstract, model_cfg, use_ema=False))
    raw_plain = {"|".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path if
                          getattr(p, "key", None) != "value"): np.asarray(v)
                 for path, v in jax.tree_util.tree_flatten_with_path(raw["params"])[0]}
    assert sorted(raw_plain) == sorted(plain)
    assert any(np.any(plain[k] != expected[k]) for k in plain)  # so the two reads are told apart
    for k, v in plain.items():
        np.testing.assert_array_equal(v, raw_plain[k], err_msg=k)

    dst = str(tmp_path / "resaved")
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", RESAVE, tiny_teacher, dst, str(tmp_path / "eight.npz")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["n_split"] > 0  # the re-saved checkpoint really is split over the 8 devices
    assert report["shardings_match"]  # and the 1-device checkpoint came back in the 8-way layout asked for
    with np.load(tmp_path / "eight.npz") as eight:
        assert sorted(eight.files) == sorted(expected)
        for k, v in expected.items():
            np.testing.assert_array_equal(eight[k], v, err_msg=k)

    # this process (its own device count) loads the 8-device checkpoint, laid out as it asks
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("d",)),
                                          jax.sharding.PartitionSpec())
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    params = load_model_params(dst, target, model_cfg)
    for x in jax.tree_util.tree_leaves(params):
        assert x.sharding == sharding
    got = _flat(params)
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # and the loaded values are the checkpoint's EMA weights (not an init), leaf for leaf
    ref_leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(raw_ema)]
    assert sum(x.size for x in ref_leaves) == sum(v.size for v in expected.values())
