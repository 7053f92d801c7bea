"""User mistakes at the command line: one line naming the key, non-zero exit, no traceback."""

from __future__ import annotations

import pytest

from conftest import run_cli


@pytest.mark.parametrize(
    "override,needle",
    [
        ("+sae.kk=3", "'sae.kk'"),
        ("training.batch_size=abc", "'training.batch_size'"),
        ("sae.k=0", "'sae.k'"),
        ("training.device=cuda", "'training.device'"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, override, needle):
    if override == "training.device=cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    proc = run_cli("saesweep.train", override, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
