"""Global batches over the batch axes of a mesh, for programs every process runs alike (sampling, evaluation,
live evaluation during training): padding, the global array each process fills from its own host copy,
replicated parameters, gathers, and a progress bar on process 0."""
from __future__ import annotations

import jax
import numpy as np
from tqdm import tqdm

from marval_jax.parallel import mesh as mesh_lib
from marval_jax.parallel import sharding as shd


def progress(desc: str, total: int, enabled: bool = True) -> tqdm:
    """A tqdm bar (images, rate, ETA) on stderr: process 0 only, and quiet when stderr is not a terminal."""
    return tqdm(total=total, desc=desc, unit="img", disable=None if enabled and jax.process_index() == 0 else True)



class GlobalBatches:
    """Batches over the batch axes of the global mesh built from `mesh_cfg` (all processes' devices).

    Every process holds the same host values (same config, same seeds): `put` gives the global array whose shards
    each process fills from its own copy (`jax.make_array_from_callback`), `replicate` puts parameters on every
    device, `gather` returns the whole of a sharded result on every process (a collective: every process calls it
    the same number of times). A batch is padded to a multiple of `ways`, the number of batch shards."""

    def __init__(self, mesh_cfg):
        self._set(mesh_lib.make_mesh(mesh_cfg), mesh_cfg.logical_axis_rules)

    @classmethod
    def over(cls, mesh, rules) -> "GlobalBatches":
        """The same over a mesh already built (a training run's, for its live evaluation)."""
        out = cls.__new__(cls)
        out._set(mesh, rules)
        return out

    def _set(self, mesh, rules) -> None:
        self.mesh, self.rules = mesh, rules
        self.replicated = shd.replicated(mesh)
        axes = self.sharding(1).spec[0]   # the mesh axes the batch dimension is split over
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        self.ways = int(np.prod([mesh.shape[a] for a in axes] or [1]))

    def sharding(self, ndim: int = 1):
        return shd.batch_sharding(self.mesh, self.rules, ndim)

    def round_up(self, n: int) -> int:
        return -(-int(n) // self.ways) * self.ways

    def pad(self, x, size: int | None = None) -> np.ndarray:
        """`x` (n, ...) padded with copies of its last row to `size` (default: n rounded up to `ways`)."""
        x = np.asarray(x)
        size = self.round_up(x.shape[0]) if size is None else size
        if x.shape[0] == size:
            return x
        return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])

    def put(self, x) -> jax.Array:
        x = np.asarray(x)
        if x.shape[0] % self.ways:
            raise ValueError(f"a global batch of {x.shape[0]} rows does not split into {self.ways} shards; pad it")
        return jax.make_array_from_callback(x.shape, self.sharding(x.ndim), lambda idx: x[idx])

    def replicate(self, tree):
        """Every leaf on every device of the mesh (parameters). Leaves sharded across processes (a checkpoint
        restored with its saved shardings) are resharded by a jitted copy; host or local leaves are copied in."""
        copy = jax.jit(lambda a: a, out_shardings=self.replicated)

        def one(leaf):
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                return copy(leaf)
            host = np.asarray(leaf)
            return jax.make_array_from_callback(host.shape, self.replicated, lambda idx: host[idx])
        return jax.tree_util.tree_map(one, tree)

    def gather(self, x: jax.Array) -> np.ndarray:
        """The whole of `x` as NumPy on every process."""
        if jax.process_count() == 1 or x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def map(self, fn, replicated_args, x, batch_size: int, desc: str = "") -> np.ndarray:
        """`fn(*replicated_args, batch)` over the rows of host array `x` in global batches of `batch_size` (rounded
        up to `ways`; the last one padded), jitted with the batch split over the devices; results gathered, the
        padding dropped. `desc`: a progress bar of that name (`progress`)."""
        x = np.asarray(x)
        bs = self.round_up(min(batch_size, x.shape[0]))
        jitted = jax.jit(fn, in_shardings=(self.replicated,) * len(replicated_args) + (self.sharding(x.ndim),),
                         out_shardings=self.sharding(2))
        out = []
        with progress(desc, x.shape[0], enabled=bool(desc)) as bar:
            for start in range(0, x.shape[0], bs):
                chunk = x[start:start + bs]
                out.append(self.gather(jitted(*replicated_args, self.put(self.pad(chunk, bs))))[: chunk.shape[0]])
                bar.update(chunk.shape[0])
        return np.concatenate(out)
