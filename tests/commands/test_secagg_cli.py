"""`flexmoe run` and `flwr run` refuse, in one line and before anything runs, what SecAgg+ cannot do:
a robust rule or server-side DP needs each client's update, which SecAgg+ hides from the server."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("overrides,words", [
    (["server.robust=median"], "server.robust needs each client's update"),
    (["server.robust=krum"], "server.robust needs each client's update"),
    (["privacy.noise_multiplier=0.5"], "server-side DP"),
])
def test_the_cli_refuses_secagg_with_rules_that_need_each_update(overrides, words, capsys, tmp_path):
    from flexmoe.cli import main

    args = ["run", "--output-dir", str(tmp_path / "run"), "--set", "secagg.enabled=true"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "secagg.enabled hides each client's update" in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # refused before a run directory was made
