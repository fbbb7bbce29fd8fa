import os
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import pytest

from marval_jax.data import latent_cache, pipeline

GLOBAL = 8


def _config(data_dir, **kw):
    kw.setdefault("in_memory", False)  # the tfds record pipeline; the in-memory path is checked against it below
    return pipeline.default_config(name="fashion_mnist", data_dir=data_dir, read_threads=2, prefetch=8, **kw)


@pytest.mark.parametrize("flip,process_count", [(False, 1), (True, 2)])
def test_in_memory_path_gives_the_record_pipelines_batches(data_dir, fmnist_size, flip, process_count):
    """Same examples, same order, same flips, same host shards, across an epoch boundary; and a restored state."""
    steps = 2 * fmnist_size // GLOBAL + 1
    for p in range(process_count):
        records = _take(pipeline.make_train_iterator(_config(data_dir, flip=flip, patch_size=4), GLOBAL, seed=7,
                                                     process_index=p, process_count=process_count), steps)
        mem_cfg = _config(data_dir, flip=flip, patch_size=4, in_memory=True, split=f"train[:{fmnist_size}]")
        it = pipeline.make_train_iterator(mem_cfg, GLOBAL, seed=7, process_index=p, process_count=process_count)
        memory = _take(it, steps - 1)
        for a, b in zip(records, memory):
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
            np.testing.assert_array_equal(a["labels"], b["labels"])
        again = pipeline.make_train_iterator(mem_cfg, GLOBAL, seed=7, process_index=p, process_count=process_count)
        again.set_state(it.get_state())
        np.testing.assert_array_equal(next(again)["tokens"], records[-1]["tokens"])
    with pytest.raises(ValueError, match="in-memory split"):
        pipeline.make_train_iterator(_config(data_dir, in_memory=True, split="train[:10%]"), GLOBAL, seed=0)
    with pytest.raises(ValueError, match="fewer than the global batch"):
        pipeline.make_train_iterator(_config(data_dir, in_memory=True, split="train[:4]"), GLOBAL, seed=0)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _keys(batch):
    """Identify examples by their (unflipped) pixels."""
    return [x.tobytes() for x in batch["images"]]


def test_batches_shapes_and_determinism(data_dir):
    a = _take(pipeline.make_train_iterator(_config(data_dir, flip=True), GLOBAL, seed=3, process_index=0,
                                           process_count=1), 3)
    b = _take(pipeline.make_train_iterator(_config(data_dir, flip=True), GLOBAL, seed=3, process_index=0,
                                           process_count=1), 3)
    c = next(pipeline.make_train_iterator(_config(data_dir, flip=True), GLOBAL, seed=4, process_index=0,
                                          process_count=1))
    assert a[0]["images"].shape == (GLOBAL, 32, 32, 1) and a[0]["images"].dtype == np.float32
    assert a[0]["labels"].shape == (GLOBAL,) and a[0]["labels"].dtype == np.int32
    assert a[0]["images"].min() == -1.0 and a[0]["images"].max() <= 1.0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
    assert not np.array_equal(a[0]["images"], c["images"])


def test_epochs_cover_the_data_and_reshuffle(data_dir, fmnist_size):
    steps = fmnist_size // GLOBAL
    batches = _take(pipeline.make_train_iterator(_config(data_dir), GLOBAL, seed=0, process_index=0,
                                                 process_count=1), 2 * steps)
    epoch1 = [k for b in batches[:steps] for k in _keys(b)]
    epoch2 = [k for b in batches[steps:] for k in _keys(b)]
    assert len(set(epoch1)) == fmnist_size and set(epoch1) == set(epoch2)
    assert epoch1 != epoch2  # reshuffled


def test_process_shards_are_disjoint_halves_of_each_global_batch(data_dir, fmnist_size):
    steps = fmnist_size // GLOBAL
    single = _take(pipeline.make_train_iterator(_config(data_dir), GLOBAL, seed=5, process_index=0,
                                                process_count=1), steps)
    hosts = [_take(pipeline.make_train_iterator(_config(data_dir), GLOBAL, seed=5, process_index=p,
                                                process_count=2), steps) for p in (0, 1)]
    assert hosts[0][0]["images"].shape == (GLOBAL // 2, 32, 32, 1)
    seen = [set(k for b in h for k in _keys(b)) for h in hosts]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == fmnist_size
    for s in range(steps):  # every global batch is the same set of examples whatever the process count
        assert set(_keys(hosts[0][s]) + _keys(hosts[1][s])) == set(_keys(single[s]))
    with pytest.raises(ValueError, match="multiple of the process count"):
        pipeline.make_train_iterator(_config(data_dir), 7, seed=0, process_index=0, process_count=2)


def test_restored_iterator_replays_the_same_batches(data_dir, tmp_path):
    cfg = _config(data_dir, flip=True)
    it = pipeline.make_train_iterator(cfg, GLOBAL, seed=1, process_index=1, process_count=2)
    _take(it, 3)
    pipeline.save_iterator_state(it, str(tmp_path), process_index=1, process_count=2)
    expected = _take(it, 12)  # crosses an epoch boundary (64 / 8 = 8 steps)
    fresh = pipeline.make_train_iterator(cfg, GLOBAL, seed=1, process_index=1, process_count=2)
    pipeline.restore_iterator_state(fresh, str(tmp_path), process_index=1, process_count=2)
    for x, y in zip(expected, _take(fresh, 12)):
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
    with pytest.raises(FileNotFoundError, match="process_0-of-2"):
        pipeline.restore_iterator_state(fresh, str(tmp_path), process_index=0, process_count=2)


def test_orbax_checkpoint_of_the_iterator(data_dir, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = _config(data_dir, flip=True)
    it = pipeline.make_train_iterator(cfg, GLOBAL, seed=2)
    _take(it, 2)
    with ocp.CheckpointManager(str(tmp_path), item_names=("data",),
                               item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 2)
    fresh = pipeline.make_train_iterator(cfg, GLOBAL, seed=2)
    with ocp.CheckpointManager(str(tmp_path), item_names=("data",),
                               item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for x, y in zip(expected, _take(fresh, 2)):
        np.testing.assert_array_equal(x["images"], y["images"])


def test_eval_iterator_pads_and_masks(data_dir):
    cfg = _config(data_dir, split="train[:10]")
    per_host = [list(pipeline.make_eval_iterator(cfg, 8, process_index=p, process_count=4)) for p in range(4)]
    assert [len(b) for b in per_host] == [2, 2, 2, 2]  # ceil(10 / 8) steps on every host
    real = [k for batches in per_host for b in batches for k, m in zip(_keys(b), b["mask"]) if m]
    assert len(real) == 10 and len(set(real)) == 10
    assert all(b["images"].shape == (2, 32, 32, 1) for batches in per_host for b in batches)
    last = list(pipeline.make_eval_iterator(_config(data_dir, split="train[:3]"), 4, process_index=3,
                                            process_count=4))  # a host without rows
    assert len(last) == 1 and not last[0]["mask"].any() and last[0]["images"].shape == (1, 32, 32, 1)


def test_latent_cache_source_and_tokens(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 8)).astype(np.float32)
    examples = [{"image": rng.uniform(-1, 1, (4, 4, 3)).astype(np.float32), "label": i} for i in range(16)]
    latent_cache.build_latent_cache(examples, lambda x: x @ a, str(tmp_path), "train", batch_size=8,
                                    num_threads=1)
    cfg = pipeline.default_config(name="latent_cache", cache_dir=str(tmp_path), flip=True, read_threads=1,
                                  prefetch=4)
    batch = next(pipeline.make_train_iterator(cfg, 4, seed=0, process_index=0, process_count=1))
    assert batch["latents"].shape == (4, 4, 4, 4) and batch["latents"].dtype == np.float32
    assert batch["labels"].dtype == np.int32
    cfg.patch_size = 2
    batch = next(pipeline.make_train_iterator(cfg, 4, seed=0, process_index=0, process_count=1))
    assert batch["tokens"].shape == (4, 4, 16)


def test_image_source_for_cache_and_bad_names(data_dir):
    ds = pipeline.image_source_for_cache(_config(data_dir, flip=True))
    ex = ds[3]
    assert ex["image"].shape == (32, 32, 1)
    np.testing.assert_array_equal(ex["image"], ds[3]["image"])  # never flipped
    with pytest.raises(ValueError, match="unknown data set name 'cifar10'.*fashion_mnist, mnist"):
        pipeline.make_train_iterator(pipeline.default_config(name="cifar10"), 8, seed=0)
    with pytest.raises(ValueError, match="needs cache_dir"):
        pipeline.make_source(pipeline.default_config(name="latent_cache"))


def test_make_global_batch_single_device():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    host = {"images": np.ones((4, 2, 2, 1), np.float32), "labels": np.arange(4, dtype=np.int32)}
    out = pipeline.make_global_batch(host, sharding)
    assert isinstance(out["images"], jax.Array) and out["images"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out["labels"]), host["labels"])


def test_make_global_batch_four_devices():
    """Own process: 4 CPU devices, batch sharded over 'data'."""
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, numpy as np
        from marval_jax.data.pipeline import make_global_batch
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        host = {"images": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "labels": np.arange(8, dtype=np.int32)}
        out = make_global_batch(host, {"images": s, "labels": s})
        assert out["images"].shape == (8, 3) and len(out["images"].addressable_shards) == 4
        assert [sh.data.shape for sh in out["labels"].addressable_shards] == [(2,)] * 4
        np.testing.assert_array_equal(np.asarray(out["images"]), host["images"])
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_in_memory_raw_dir_is_read_and_named_when_files_are_missing(tmp_path):
    """The in-memory path reads data.raw_dir: a folder without the raw files is an error naming the field and the
    missing file; MNIST's raw_dir may be the pickle's folder or the pickle itself."""
    import gzip
    import pickle
    from marval_jax.data import raw_datasets
    from marval_jax.user_errors import is_user_error
    cfg = pipeline.default_config(name="fashion_mnist", in_memory=True, raw_dir=str(tmp_path), read_threads=1)
    with pytest.raises(FileNotFoundError) as info:
        pipeline.make_train_iterator(cfg, GLOBAL, seed=0, process_index=0, process_count=1)
    msg = str(info.value)
    assert is_user_error(info.value)
    assert "data.raw_dir=" in msg and os.path.join(str(tmp_path), "train-images-idx3-ubyte.gz") in msg

    rng = np.random.default_rng(0)
    part = lambda n: (rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n))  # noqa: E731
    parts = (part(GLOBAL), part(3), part(2))
    with gzip.open(tmp_path / raw_datasets.MNIST_FILE, "wb") as f:
        pickle.dump(parts, f)
    for raw_dir in (str(tmp_path), str(tmp_path / raw_datasets.MNIST_FILE)):
        images, labels = pipeline.load_small_split("mnist", "train", raw_dir)
        assert images.shape == (GLOBAL, 28, 28) and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, parts[0][1])
        mcfg = pipeline.default_config(name="mnist", in_memory=True, raw_dir=raw_dir, read_threads=1)
        batch = next(pipeline.make_train_iterator(mcfg, GLOBAL, seed=0, process_index=0, process_count=1))
        assert batch["images"].shape == (GLOBAL, 32, 32, 1)
    with pytest.raises(FileNotFoundError, match="data.raw_dir="):
        pipeline.load_small_split("mnist", "train", str(tmp_path / "none" / raw_datasets.MNIST_FILE))
