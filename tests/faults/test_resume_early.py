"""A run killed in its first seconds, before it wrote config.yaml: `tokenmdp train --resume` with the same
arguments starts it from step 0 (it used to answer "no config.yaml there"), and ends where a straight run ends."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tokenmdp.cli import main

from test_trainer import SMALL  # noqa: E402  (tests/ is on the path: conftest.py; registers the parity task)


def _args(model_dir, out, *extra):
    sets = [x for item in SMALL for x in ("--set", item)]
    return ["train", "--algo", "grpo_nokl", "--out", str(out), "--set", f"model.path={model_dir}", *sets,
            "--no-progress", *extra]


@pytest.mark.parametrize("leftover", ["nothing", "empty folder", "a killed write"])
def test_resume_before_anything_was_written_starts_afresh(tmp_path, tiny_random_dir, capsys, leftover):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_args(tiny_random_dir, straight)) == 0
    if leftover != "nothing":
        killed.mkdir()
    if leftover == "a killed write":
        (killed / ".final.tmp-abc").mkdir()
    assert main(_args(tiny_random_dir, killed, "--resume")) == 0
    assert "nothing of the run was written yet" in capsys.readouterr().err
    a, b = (load_file(str(p / "final" / "model.safetensors")) for p in (straight, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise the straight run
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith(".")) == []


def test_resume_of_a_folder_with_something_else_in_it_still_refuses(tmp_path, tiny_random_dir, capsys):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(_args(tiny_random_dir, folder, "--resume")) == 2
    assert "no config.yaml there" in capsys.readouterr().err and (folder / "notes.txt").read_text() == "mine"
