"""deploy/: the systemd unit verifies, the container files mirror the README's install, the compose
environment is a valid node configuration and the node and Orthanc in it point at each other."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from node.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # The unit names /opt/lungnode; point it at this checkout so the ExecStart binaries exist.
    unit = tmp_path / "lungnode.service"
    unit.write_text((DEPLOY / "lungnode.service").read_text().replace("/opt/lungnode", str(REPO)))
    if not (REPO / ".venv" / "bin" / "lungnode").exists():
        pytest.skip("no .venv/bin/lungnode in this checkout (run deploy/install.sh)")
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_metrics_timer_and_service_verify(tmp_path: Path) -> None:
    for name in ("lungnode-metrics.service", "lungnode-metrics.timer"):
        (tmp_path / name).write_text((DEPLOY / name).read_text().replace("/opt/lungnode", str(REPO)))
    if not (REPO / ".venv" / "bin" / "lungnode").exists():
        pytest.skip("no .venv/bin/lungnode in this checkout (run deploy/install.sh)")
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "lungnode-metrics.service"),
                           str(tmp_path / "lungnode-metrics.timer")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    service = (DEPLOY / "lungnode-metrics.service").read_text()
    assert "lungnode status --metrics --config /etc/lungnode/config.yaml" in service
    # renamed into place, also when the ledger could not be read: the collector never reads half a file or an old one
    assert "lungnode.prom.tmp; rc=$$?; mv" in service and "exit $$rc" in service


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_worker_unit_verifies_and_restarts_a_worker_that_ended_a_hung_job(tmp_path: Path) -> None:
    from node.pipeline.worker import EXIT_JOB_TIMED_OUT

    text = (DEPLOY / "lungnode-worker.service").read_text()
    (tmp_path / "lungnode-worker.service").write_text(text.replace("/opt/lungnode", str(REPO)))
    if not (REPO / ".venv" / "bin" / "lungnode").exists():
        pytest.skip("no .venv/bin/lungnode in this checkout (run deploy/install.sh)")
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "lungnode-worker.service")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    assert "ExecStart=/opt/lungnode/.venv/bin/lungnode worker --config /etc/lungnode/config.yaml" in text
    # exit 75 (workers.max_job_s) is a failure to systemd: Restart=on-failure starts a fresh worker
    assert EXIT_JOB_TIMED_OUT != 0 and "Restart=on-failure" in text and "SuccessExitStatus" not in text


def test_systemd_unit_runs_serve_with_a_checked_config() -> None:
    text = (DEPLOY / "lungnode.service").read_text()
    assert "ExecStartPre=/opt/lungnode/.venv/bin/lungnode check-config /etc/lungnode/config.yaml" in text
    assert "ExecStart=/opt/lungnode/.venv/bin/lungnode serve --config /etc/lungnode/config.yaml" in text
    assert "KillSignal=SIGTERM" in text and "User=lungnode" in text


def test_dockerfile_installs_with_the_readme_script_and_copies_what_it_needs() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "RUN bash deploy/install.sh --node-only" in text
    for path in ("pyproject.toml", "node", "models", "sr_templates", "deploy"):
        assert f"COPY {path}" in text, path
        assert (REPO / path).exists(), f"the Dockerfile copies {path}, which is missing"


def test_the_image_keeps_spool_and_database_in_its_volume() -> None:
    """The image runs as an unprivileged user in a root-owned /opt: a relative default database path could not be
    created there, and a database outside the volume (the queue and audit trail) would go with the container."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'VOLUME ["/var/lib/lungnode"]' in text and "WORKDIR /var/lib/lungnode" in text.split("USER lungnode")[1]
    # nothing in the image's environment overrides a mounted config's storage; the defaults count from WORKDIR
    assert not re.findall(r"LUNGNODE_STORAGE__\w+", text)
    defaults = load_config(None, environ={}).storage
    assert not defaults.spool_dir.is_absolute() and defaults.database_url.startswith("sqlite:///./")
    # compose keeps the same defaults, so `docker run` and `compose up` on one volume share one ledger
    compose = load_config(None, environ={k: str(v) for k, v in
                                         _compose()["services"]["lungnode"]["environment"].items()}).storage
    assert compose == defaults


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_environment_is_a_valid_node_configuration() -> None:
    env = {k: str(v) for k, v in _compose()["services"]["lungnode"]["environment"].items()}
    cfg = load_config(None, environ=env)
    assert cfg.dicom.ae_title == "LUNGNODE"
    assert [d.host for d in cfg.destinations] == ["orthanc"]
    assert [c.ae_title for c in cfg.dicom.allowed_callers] == ["PACS"]


def test_compose_node_and_orthanc_point_at_each_other() -> None:
    compose = _compose()
    env = {k: str(v) for k, v in compose["services"]["lungnode"]["environment"].items()}
    cfg = load_config(None, environ=env)
    orthanc = json.loads((DEPLOY / "orthanc.json").read_text())
    peer = orthanc["DicomModalities"]["lungnode"]
    assert (peer["AET"], peer["Host"], peer["Port"]) == (cfg.dicom.ae_title, "lungnode", cfg.dicom.port)
    dest = cfg.destinations[0]
    assert (dest.ae_title, dest.port) == (orthanc["DicomAet"], orthanc["DicomPort"])
    for service in ("lungnode", "orthanc"):
        build = compose["services"][service]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
