"""benchmarks/compile_cost: the RL step's program size under the settings that shape it, without running it. The
counts must move the way the program's structure says: one loop body per encoder-length bucket (each with its
backward pass), one block body per scanned stack."""
from __future__ import annotations

import dataclasses
import json

import pytest

from marval_jax.benchmarks import compile_cost
from marval_jax.benchmarks.model_bench import model_config
from marval_jax.user_errors import UserError

# the suite's tiny model with two blocks per stack (one block has nothing to scan)
CFG = dataclasses.replace(model_config("tiny"), encoder_depth=2, decoder_depth=2)


def _lower(scan: bool, buckets: int) -> dict:
    return compile_cost.measure(dataclasses.replace(CFG, scan_blocks=scan), batch=1, num_iter=4, num_buckets=buckets,
                                compile_program=False)


def test_buckets_and_scan_shrink_the_program():
    unrolled4, unrolled1, scanned4 = _lower(False, 4), _lower(False, 1), _lower(True, 4)
    assert unrolled4["loop_bodies"] > unrolled1["loop_bodies"] == 1
    assert unrolled4["lowered_ops"] > unrolled1["lowered_ops"]
    assert unrolled4["lowered_ops"] > scanned4["lowered_ops"]
    assert scanned4["loop_bodies"] == unrolled4["loop_bodies"]   # the scan leaves the AR loop's plan alone


def test_cli_compiles_each_setting_and_writes_the_rows(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert compile_cost.main(["--models", "tiny", "--num-buckets", "2,1", "--scan-blocks", "off", "--num-iter", "2",
                              "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["platform"] == "cpu" and [r["num_buckets"] for r in report["rows"]] == [2, 1]
    assert all(r["compile_s"] > 0 and r["compiled_instructions"] > 0 for r in report["rows"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


@pytest.mark.parametrize("args", [["--num-buckets", "0"], ["--num-buckets", "a"], ["--rl-batch", "0"],
                                  ["--models", "nope"]])
def test_bad_arguments_are_user_errors(args):
    with pytest.raises(UserError):
        compile_cost.main(["--lower-only", *args])
