"""marval_jax/package_files.py: files read out of wheels that are unpacked, not installed."""
import pathlib
import re
import subprocess
import sys

import pytest

from marval_jax import package_files


def test_find_prefers_the_unpacked_folder_and_names_every_place_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(package_files.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        package_files.find("open_clip", "no_such_file.txt")
    msg = str(e.value)
    assert str(tmp_path / "open_clip" / "no_such_file.txt") in msg
    assert "open-clip-torch==3.3.0" in msg and "package_files fetch" in msg
    (tmp_path / "open_clip").mkdir()
    (tmp_path / "open_clip" / "no_such_file.txt").write_text("x")
    assert package_files.find("open_clip", "no_such_file.txt") == str(tmp_path / "open_clip" / "no_such_file.txt")


def test_set_up_unpacked_every_file_we_read_and_installed_none_of_the_wheels():
    """What launch/setup_env.sh left: the three files found, and pip lists none of the three distributions (so
    `pip check` has no conflicts of theirs to report)."""
    from marval_jax.data.raw_datasets import mnist_pickle_path
    from marval_jax.rewards.clip_tokenizer import default_bpe_path
    from marval_jax.tools.convert_inception import default_torchscript_path
    for path in (mnist_pickle_path(), default_bpe_path(), default_torchscript_path()):
        assert pathlib.Path(path).stat().st_size > 0, path
    def canonical(name):  # PEP 503: pip prints open_clip_torch for open-clip-torch
        return re.sub(r"[-_.]+", "-", name).lower()
    freeze = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, check=True).stdout
    installed = {canonical(line.split("==")[0]) for line in freeze.splitlines() if "==" in line}
    for requirement in package_files.WHEELS.values():
        assert canonical(requirement.split("==")[0]) not in installed, requirement
