"""``lungnode`` command line: what each command's --help promises, and option combinations it refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.cli import main as cli_main
from node.db.models import Job, JobState, OutboxItem, SendState, Series, SeriesOrigin, SeriesState, Study


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


def _config(tmp_path: Path, settings: dict[str, Any]) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc on this system")
def test_check_config_finds_folders_even_root_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Permission bits say yes to root everywhere: /proc passed as writable, and serve then refused it. Only
    creating a file tells; nothing is left behind where it can."""
    spool, log_file = Path("/proc/lungnode-test-spool"), Path("/proc/lungnode-test.log")
    path = _config(tmp_path, {"storage": {"spool_dir": str(spool), "database_url": f"sqlite:///{tmp_path / 'db' / 'ln.db'}"},
                              "logging": {"file": str(log_file)}})
    assert cli_main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"logging.file: {log_file} cannot be created by this user (/proc is not writable)" in err, err
    assert f"storage.spool_dir: {spool} cannot be created by this user (/proc is not writable)" in err, err
    assert "storage.database_url" not in err, err

    fine = _config(tmp_path, {"storage": {"spool_dir": str(tmp_path / "spool"),
                                          "database_url": f"sqlite:///{tmp_path / 'ln.db'}"},
                              "logging": {"file": str(tmp_path / "node.log")}})
    before = sorted(tmp_path.iterdir())
    assert cli_main(["check-config", str(fine)]) == 0, capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == before, "the probe files are removed"
    (tmp_path / "node.log").write_text("kept\n", encoding="utf-8")
    assert cli_main(["check-config", str(fine)]) == 0  # an existing log file: opened for append, left as it was
    assert (tmp_path / "node.log").read_text(encoding="utf-8") == "kept\n"


def test_check_config_strict_names_every_model_that_cannot_be_used(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """All three folders missing: the first alone was said, and the next run found the second."""
    models = tmp_path / "models"
    models.mkdir()
    path = _config(tmp_path, {"inference": {"models_dir": str(models)}})
    assert cli_main(["check-config", "--strict", str(path)]) == 2
    err = capsys.readouterr().err
    for name in ("lung_seg", "lesion_seg", "diagnosis"):
        assert f"model folder {models / name} does not exist" in err, err
    assert err.count("lungnode models --config") == 1, err
    assert cli_main(["check-config", str(path)]) == 0  # without --strict: the same, as warnings
    warnings = capsys.readouterr().err.splitlines()
    assert len([w for w in warnings if w.startswith("warning:") and "does not exist" in w]) == 3, warnings


def _ledger_config(tmp_path: Path, engine: Engine, **settings: Any) -> Path:
    return _config(tmp_path, {"storage": {"database_url": str(engine.url), "spool_dir": str(tmp_path / "spool")},
                              **settings})


def test_status_of_a_job_that_does_not_exist_says_so(engine: Engine, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped job id is not a study the PACS failed to route: no routing advice, the not-found exit status."""
    config = _ledger_config(tmp_path, engine)
    assert cli_main(["status", "--job", "999", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "there is no job 999" in err and "routing" not in err, err
    assert cli_main(["status", "--accession", "A1", "--config", str(config)]) == 1  # the other not-found case
    assert "routing" in capsys.readouterr().err


def test_sends_to_a_destination_no_longer_configured_are_not_promised(
        engine: Engine, sessions: sessionmaker[Session], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pacs` renamed in the configuration: retry said its failed sends would go within the poll interval, and
    status listed them as pending; neither said they can never go until `pacs` is configured again."""
    with sessions.begin() as s:
        series = Series(study=Study(study_instance_uid="1.2.5"), series_instance_uid="1.2.5.1", modality="CT",
                        origin=SeriesOrigin.modality, state=SeriesState.complete)
        job = Job(series=series, revision=1, state=JobState.done)
        s.add(job)
        s.flush()
        for n, dest in enumerate(("pacs", "pacs", "archive")):
            s.add(OutboxItem(job_id=job.id, destination=dest, kind="sr", path=str(tmp_path / f"sr{n}.dcm"),
                             sop_instance_uid=f"1.2.5.9.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                             transfer_syntax_uid="1.2.840.10008.1.2.1", state=SendState.failed))
    config = _ledger_config(tmp_path, engine, destinations=[
        {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 11199}])

    assert cli_main(["retry", "--failed", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert "requeued 1 failed or waiting send(s) to archive" in out and "pacs" not in out, out
    assert (f"2 failed or waiting send(s) to pacs (all jobs) cannot be sent: pacs is not a destination in {config} "
            "(its destinations: archive)") in err, err
    assert "Add it back to destinations" in err and "they stay unsent" in err, err
    with sessions() as s:  # left as they were: no fresh attempts for a destination nothing sends to
        assert sorted((o.destination, o.state, o.attempts) for o in s.query(OutboxItem)) == [
            ("archive", SendState.pending, 0), ("pacs", SendState.failed, 0), ("pacs", SendState.failed, 0)]

    assert cli_main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert ("pacs is not configured: add it back to destinations (and restart the node), or its 2 unsent "
            "result(s) are never sent") in text, text
    assert "archive is not configured" not in text
    assert cli_main(["status", "--json", "--config", str(config)]) == 0
    outbox = json.loads(capsys.readouterr().out)["outbox"]
    assert (outbox["pacs"]["configured"], outbox["archive"]["configured"]) == (False, True)


def test_demo_help_names_every_result_it_waits_for(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo waits for the KOS too (node.demo.RESULT_MODALITIES): its help listed SEG, SR and key image only."""
    from node.demo import RESULT_MODALITIES

    assert set(RESULT_MODALITIES.values()) == {"seg", "sr", "key_image", "kos"}
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    assert "gets its results back (SEG, SR, key images and KOS)" in listing, listing
    assert "key images and the Key Object Selection" in " ".join(_help(capsys, "demo").split())
