"""benchmarks/compile_cost: program sizes under the settings that shape them, without running anything. The counts
must move the way the programs' structure says: one loop body per encoder-length bucket (the RL step's each with its
backward pass), one block body per scanned stack, a cached sampler larger than the uncached one."""
from __future__ import annotations

import dataclasses
import json

import pytest

from marval_jax.benchmarks import compile_cost
from marval_jax.benchmarks.model_bench import model_config
from marval_jax.user_errors import UserError

# the suite's tiny model with two blocks per stack (one block has nothing to scan)
CFG = dataclasses.replace(model_config("tiny"), encoder_depth=2, decoder_depth=2)


def _lower(scan: bool, buckets: int, program: str = "train/rl") -> dict:
    return compile_cost.measure(dataclasses.replace(CFG, scan_blocks=scan), program=program, name="tiny", batch=1,
                                num_iter=4, num_buckets=buckets, compile_program=False)


def test_buckets_and_scan_shrink_the_program():
    unrolled4, unrolled1, scanned4 = _lower(False, 4), _lower(False, 1), _lower(True, 4)
    assert unrolled4["plan_pieces"] > unrolled1["plan_pieces"] == 1
    assert unrolled4["lowered_ops"] > unrolled1["lowered_ops"]
    assert unrolled4["lowered_ops"] > scanned4["lowered_ops"]
    assert scanned4["plan_pieces"] == unrolled4["plan_pieces"]   # the scan leaves the AR loop's plan alone


def test_samplers_cached_larger_and_fewer_buckets_smaller():
    plain4, cached4, cached1 = (_lower(False, nb, p) for nb, p in ((4, "sample/onestep"), (4, "kv/onestep/approx"),
                                                                    (1, "kv/onestep/approx")))
    assert cached4["lowered_ops"] > plain4["lowered_ops"]
    assert cached4["plan_pieces"] > cached1["plan_pieces"] == 1 and cached4["lowered_ops"] > cached1["lowered_ops"]
    teacher = _lower(False, 4, "sample/teacher")
    assert teacher["plan_pieces"] == plain4["plan_pieces"] and teacher["lowered_ops"] != plain4["lowered_ops"]


def test_cli_compiles_each_setting_and_writes_the_rows(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert compile_cost.main(["--models", "tiny", "--num-buckets", "2,1", "--scan-blocks", "off", "--num-iter", "2",
                              "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["platform"] == "cpu" and [r["num_buckets"] for r in report["rows"]] == [2, 1]
    assert all(r["compile_s"] > 0 and r["compiled_instructions"] > 0 for r in report["rows"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


@pytest.mark.parametrize("args", [["--num-buckets", "0"], ["--num-buckets", "a"], ["--batch", "0"],
                                  ["--models", "nope"], ["--programs", "sample/nope"], ["--kv-approx", "2"],
                                  ["--out", "/no/such/folder/cost.json"]])
def test_bad_arguments_are_user_errors(args):
    with pytest.raises(UserError):
        compile_cost.main(["--lower-only", *args])
