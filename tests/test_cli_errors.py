"""Only dspt's own errors become one line; a bug keeps its traceback; -v shows both."""
from __future__ import annotations

import pytest

from dspt import cli
from dspt.errors import DataError

from clirun import run_cli


def test_own_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(cli, "cmd_losses", lambda args: (_ for _ in ()).throw(DataError("no images; add some")))
    monkeypatch.setitem(cli.COMMANDS, "losses", (cli.cmd_losses, "x"))
    code, _, err = run_cli(["losses"])
    assert code == 2 and err.strip() == "dspt: error: no images; add some"
    code, _, err = run_cli(["-v", "losses"])
    assert code == 2 and "Traceback" in err and err.strip().endswith("dspt: error: no images; add some")

    monkeypatch.setitem(cli.COMMANDS, "losses", (lambda args: {}["bug"], "x"))
    with pytest.raises(KeyError):  # not swallowed into a one-line message
        cli.main(["losses"])
    monkeypatch.setitem(cli.COMMANDS, "losses", (lambda args: int("x"), "x"))
    with pytest.raises(ValueError):  # a plain ValueError is a bug, not a user error
        cli.main(["losses"])


def test_run_summary_says_what_a_missing_memorisation_means():
    metrics = {"test_acc": 50.0, "zeroshot_acc": 40.0, "gain_over_zeroshot": 10.0, "noise": {"realised_rate": 0.0},
               "train": {"memorised": float("nan")}, "first_loss": 1.0, "final_loss": 0.5}
    line = cli.run_summary(metrics)
    assert "nan" not in line and "none to memorise (no training label is wrong)" in line
    metrics["train"]["memorised"] = 12.5
    assert "memorised wrong labels 12.5%" in cli.run_summary(metrics)
