"""``lungnode`` command line: what each command's --help promises, and option combinations it refuses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from node.cli import main as cli_main


@pytest.fixture(autouse=True)
def _no_outside_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LUNGNODE_"):
            monkeypatch.delenv(name)


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("action", [[], ["list"], ["verify"]], ids=["models", "list", "verify"])
def test_models_help_lists_the_config_option_it_takes(capsys: pytest.CaptureFixture[str], action: list[str]) -> None:
    """``lungnode models verify --config F`` works: its help must say so, and needs no configuration itself."""
    out = _help(capsys, "models", *action)
    assert "--config FILE, -c FILE" in out, out
    assert f"usage: lungnode models {action[0]}" in out if action else "ACTION" in out


def test_models_help_reads_no_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom: {port: 0}\n", encoding="utf-8")
    assert "--config FILE" in _help(capsys, "models", "verify", "--config", str(bad))


@pytest.mark.parametrize(
    ("command", "statuses"),
    [
        ("worker", ["0 stopped by SIGTERM or Ctrl-C", "2 could not start"]),
        ("demo", ["0 the results came back", "1 the node stopped or the results did not come back",
                  "2 Orthanc is not installed", "130 Ctrl-C before the results were in"]),
    ],
)
def test_help_states_the_exit_statuses(capsys: pytest.CaptureFixture[str], command: str, statuses: list[str]) -> None:
    out = " ".join(_help(capsys, command).split())  # argparse wraps lines
    assert "Exit status:" in out
    for status in statuses:
        assert status in out, (status, out)


def test_status_refuses_metrics_for_one_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--metrics counts the whole node; with a study option it printed that study's report instead, silently."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": {"database_url": f"sqlite:///{tmp_path / 'ln.db'}"}}),
                      encoding="utf-8")
    for option in (["--accession", "A1"], ["--job", "3"], ["--study", "1.2.3"]):
        assert cli_main(["status", "--metrics", *option, "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert "--metrics counts the whole node: give it without a study option" in err, err
