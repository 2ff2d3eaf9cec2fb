"""Configuration: embedded defaults, then the YAML file, then LUNGNODE_* environment variables;
strict validation whose messages name the offending key; ``lungnode check-config`` exit codes."""

from __future__ import annotations

import argparse
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from node.cli import main as cli_main
from node.config import AllowedCaller, Config, load_config
from node.errors import ConfigError
from tests.helpers.node_proc import REPO, run_cli

EXAMPLE = REPO / "deploy" / "config.example.yaml"


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _no_outside_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads os.environ: make sure no LUNGNODE_* from the outside leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("LUNGNODE_"):
            monkeypatch.delenv(name)


# -- defaults -----------------------------------------------------------------------------------
def test_defaults_without_file_or_environment() -> None:
    cfg = load_config(None, environ={})
    assert cfg.dicom.ae_title == "LUNGNODE"
    assert cfg.dicom.port == 11112
    assert cfg.dicom.bind_address == "0.0.0.0"
    assert cfg.dicom.allowed_callers == []
    assert cfg.dicom.tcp_nodelay is True
    assert cfg.storage.database_url == "sqlite:///./var/lungnode.db"
    assert cfg.storage.spool_dir == Path("./var/spool")
    assert cfg.storage.min_free_disk_mb == 1024
    assert cfg.storage.fsync is True
    assert cfg.assembly.quiet_period_s == 60.0
    assert cfg.assembly.release_grace_s == 2.0
    assert cfg.logging.level == "INFO"
    assert cfg.logging.include_phi is False


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "c.yaml", ""), environ={})
    assert cfg == load_config(None, environ={})


# -- precedence ---------------------------------------------------------------------------------
def test_file_overrides_defaults_and_keeps_the_rest(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"dicom": {"port": 11113}, "assembly": {"quiet_period_s": 5}})
    cfg = load_config(path, environ={})
    assert cfg.dicom.port == 11113
    assert cfg.dicom.ae_title == "LUNGNODE"  # same section, not in the file: default kept
    assert cfg.assembly.quiet_period_s == 5.0
    assert cfg.assembly.release_grace_s == 2.0


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"dicom": {"port": 11113, "ae_title": "FROMFILE"},
                                            "storage": {"min_free_disk_mb": 10}})
    env = {
        "LUNGNODE_DICOM__PORT": "11114",
        "LUNGNODE_STORAGE__SPOOL_DIR": "/srv/spool",
        "LUNGNODE_STORAGE__DATABASE_URL": "sqlite:////srv/ledger.db",
        "LUNGNODE_ASSEMBLY__QUIET_PERIOD_S": "2.5",
        "LUNGNODE_DICOM__ALLOWED_CALLERS": "[{ae_title: PACS, host: 10.0.0.5}, {ae_title: CT1}]",
        "OTHER_VARIABLE": "ignored",
        "LUNGNODE_NO_DOUBLE_UNDERSCORE": "ignored",
    }
    cfg = load_config(path, environ=env)
    assert cfg.dicom.port == 11114  # env beats file
    assert cfg.dicom.ae_title == "FROMFILE"  # file beats default
    assert cfg.storage.min_free_disk_mb == 10
    assert cfg.storage.spool_dir == Path("/srv/spool")
    assert cfg.storage.database_url == "sqlite:////srv/ledger.db"
    assert cfg.assembly.quiet_period_s == 2.5
    assert cfg.dicom.allowed_callers == [AllowedCaller(ae_title="PACS", host="10.0.0.5"), AllowedCaller(ae_title="CT1")]


def test_a_single_underscore_after_a_section_is_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match="LUNGNODE_DICOM_PORT: .*two underscores: LUNGNODE_DICOM__PORT"):
        load_config(None, environ={"LUNGNODE_DICOM_PORT": "11114"})
    assert load_config(None, environ={"LUNGNODE_SYNTH_THREADS": "2"}).dicom.port == Config().dicom.port  # not ours


def test_environment_without_file(tmp_path: Path) -> None:
    cfg = load_config(None, environ={"LUNGNODE_DICOM__AE_TITLE": "NODE_A", "LUNGNODE_STORAGE__FSYNC": "false"})
    assert cfg.dicom.ae_title == "NODE_A"
    assert cfg.storage.fsync is False


@pytest.mark.parametrize("value", ["1234", "NO"])
def test_environment_string_values_stay_strings(value: str) -> None:
    cfg = load_config(None, environ={"LUNGNODE_DICOM__AE_TITLE": value})
    assert cfg.dicom.ae_title == value


# -- errors name the key -------------------------------------------------------------------------
def _error(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ=environ or {})
    return str(exc.value)


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    msg = _error(write_yaml(tmp_path / "c.yaml", {"dicom": {"prot": 11113}}))
    assert "dicom.prot: unknown key" in msg
    assert str(tmp_path / "c.yaml") in msg


def test_unknown_section_is_named(tmp_path: Path) -> None:
    assert "dicomm: unknown key (did you mean dicom?)" in _error(write_yaml(tmp_path / "c.yaml", {"dicomm": {"port": 1}}))


@pytest.mark.parametrize(("data", "said"), [
    ({"dicom": {"prot": 11113}}, "dicom.prot: unknown key (did you mean port?)"),
    ({"assembly": {"quiet_period": 5}}, "assembly.quiet_period: unknown key (did you mean quiet_period_s?)"),
    ({"dicom": {"tls": {"enabled": False, "privatekey": "k.pem"}}},
     "dicom.tls.privatekey: unknown key (did you mean private_key?)"),
    ({"destinations": [{"name": "pacs", "host": "127.0.0.1", "port": 104, "ae_titel": "PACS"}]},
     "destinations[pacs].ae_titel: unknown key (did you mean ae_title?)"),
    ({"destinations": [{"name": "web", "url": "https://127.0.0.1/dicom-web", "tokne_file": "/t"}]},
     "destinations[web].tokne_file: unknown key (did you mean token_file?)"),
    # a DICOMweb destination is not offered the keys of a DICOM one (port), nor the other way round
    ({"destinations": [{"name": "web", "url": "https://127.0.0.1/dicom-web", "prot": 443}]},
     "destinations[web].prot: unknown key"),
    ({"destinations": [{"name": "pacs", "host": "127.0.0.1", "port": 104, "ae_title": "PACS", "urll": "x"}]},
     "destinations[pacs].urll: unknown key"),
])
def test_a_misspelt_key_is_named_with_the_key_meant(tmp_path: Path, data: dict[str, Any], said: str) -> None:
    msg = _error(write_yaml(tmp_path / "c.yaml", data))
    assert said in msg, msg
    assert "did you mean" in said or "did you mean" not in msg, msg


def test_an_unknown_key_like_no_other_gets_no_guess(tmp_path: Path) -> None:
    msg = _error(write_yaml(tmp_path / "c.yaml", {"dicom": {"colour": "red"}}))
    assert "dicom.colour: unknown key" in msg and "did you mean" not in msg


def test_unknown_key_from_environment_is_named() -> None:
    msg = _error(None, {"LUNGNODE_ASSEMBLY__QUIET_PERIOD": "3"})
    assert "assembly.quiet_period: unknown key" in msg
    assert "environment" in msg


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"dicom": {"port": 70000}}, "dicom.port", "less than or equal to 65535"),
        ({"dicom": {"port": "eleven"}}, "dicom.port", "integer"),
        ({"dicom": {"max_pdu_size": 100}}, "dicom.max_pdu_size", "at least 4096"),
        ({"assembly": {"quiet_period_s": 0}}, "assembly.quiet_period_s", "greater than 0"),
        ({"assembly": {"release_grace_s": -1}}, "assembly.release_grace_s", "greater than or equal to 0"),
        ({"storage": {"min_free_disk_mb": -5}}, "storage.min_free_disk_mb", "greater than or equal to 0"),
        ({"logging": {"level": "LOUD"}}, "logging.level", "DEBUG"),
        ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 0}]},
         "destinations[pacs].port", "greater than or equal to 1"),
        ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "", "port": 104}]},
         "destinations[pacs].host", "not a host name or IP address"),  # empty: the socket layer would pick this machine
        ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "pacs .local", "port": 104}]},
         "destinations[pacs].host", "not a host name or IP address"),
        ({"dicom": {"allowed_callers": [{"ae_title": "CT1", "host": "http://ct1"}]}},
         "dicom.allowed_callers.0.host", "not an IP address"),
        # compared with the caller's address as it is: a host name would refuse every association from that PACS
        ({"dicom": {"allowed_callers": [{"ae_title": "PACS", "host": "pacs.hospital.local"}]}},
         "dicom.allowed_callers.0.host", "host names are not resolved"),
    ],
)
def test_bad_value_is_named(tmp_path: Path, data: dict[str, object], key: str, words: str) -> None:
    msg = _error(write_yaml(tmp_path / "c.yaml", data))
    line = next((ln for ln in msg.splitlines() if ln.strip().startswith(key + ":")), None)
    assert line is not None, msg
    assert words in line


def test_bad_value_from_environment_is_named() -> None:
    msg = _error(None, {"LUNGNODE_DICOM__PORT": "0"})
    assert "dicom.port:" in msg and "greater than or equal to 1" in msg


def test_errors_name_the_environment_variable_that_set_the_bad_value(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"dicom": {"max_pdu_size": 100}})
    msg = _error(path, {"LUNGNODE_DICOM__PORT": "abc", "LUNGNODE_ASSEMBLY__QUIET_PERIOD": "3",
                        "LUNGNODE_DESTINATIONS": "[{name: pacs}]"})
    lines = {ln.strip().split(":")[0]: ln for ln in msg.splitlines()[1:]}
    assert lines["dicom.port"].endswith("(set by environment variable LUNGNODE_DICOM__PORT)")
    assert lines["assembly.quiet_period"].endswith("(set by environment variable LUNGNODE_ASSEMBLY__QUIET_PERIOD)")
    assert lines["destinations[pacs].host"].endswith("(set by environment variable LUNGNODE_DESTINATIONS)")
    assert "environment variable" not in lines["dicom.max_pdu_size"]  # that one came from the file


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    msg = _error(write_yaml(tmp_path / "c.yaml", {"dicom": {"port": 0, "colour": "red"}, "storage": {"fsync": "maybe"}}))
    assert "dicom.port:" in msg
    assert "dicom.colour: unknown key" in msg
    assert "storage.fsync:" in msg


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    assert "not valid YAML" in _error(write_yaml(tmp_path / "a.yaml", "dicom: {port: [1,\n"))
    assert "top level must be a mapping" in _error(write_yaml(tmp_path / "b.yaml", "- a\n- b\n"))
    assert "cannot read config file" in _error(tmp_path / "missing.yaml")


def test_a_key_written_twice_is_refused_with_both_places(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys without a word; a config file must not."""
    path = write_yaml(tmp_path / "dup.yaml", "dicom:\n  port: 11112\n  ae_title: A\n  port: 11113\n")
    msg = _error(path)
    assert "the key 'port' appears twice" in msg
    assert f'in "{path}", line 2' in msg and f'in "{path}", line 4' in msg


# -- AE titles -----------------------------------------------------------------------------------
@pytest.mark.parametrize("title", ["LUNGNODE", "PACS_1", "MY AE", "A", "ABCDEFGHIJKLMNOP", "ct-2.lab"])
def test_valid_ae_titles(title: str) -> None:
    assert Config.model_validate({"dicom": {"ae_title": title}}).dicom.ae_title == title


def test_ae_title_surrounding_spaces_are_not_significant() -> None:
    assert Config.model_validate({"dicom": {"ae_title": " PACS "}}).dicom.ae_title == "PACS"


@pytest.mark.parametrize(
    "title",
    ["", "    ", "ABCDEFGHIJKLMNOPQ", "BACK\\SLASH", "TAB\tAE", "NEW\nLINE", "ÄRZTE"],
    ids=["empty", "spaces", "17-chars", "backslash", "tab", "newline", "non-ascii"],
)
def test_invalid_ae_titles_are_refused_and_named(tmp_path: Path, title: str) -> None:
    msg = _error(write_yaml(tmp_path / "c.yaml", {"dicom": {"ae_title": title}}))
    assert "dicom.ae_title:" in msg
    assert "AE title is 1 to 16 printable characters" in msg


def test_invalid_allowed_caller_ae_title_is_named(tmp_path: Path) -> None:
    data = {"dicom": {"allowed_callers": [{"ae_title": "PACS"}, {"ae_title": "WAY_TOO_LONG_AE_TITLE"}]}}
    msg = _error(write_yaml(tmp_path / "c.yaml", data))
    assert "dicom.allowed_callers.1.ae_title:" in msg


def test_database_url_that_is_not_a_url_is_named(tmp_path: Path) -> None:
    msg = _error(write_yaml(tmp_path / "c.yaml", {"storage": {"database_url": "not a url"}}))
    assert "storage.database_url: Value error, not a database URL" in msg


def test_status_never_creates_an_empty_database_elsewhere(tmp_path: Path) -> None:
    """Run from the wrong folder with the default SQLite URL, status says where it looked instead of making a new,
    empty ledger there and reporting an empty node."""
    from node.cli import main
    from node.errors import LungnodeError

    cfg = write_yaml(tmp_path / "c.yaml", {"storage": {"database_url": f"sqlite:///{tmp_path / 'var' / 'ln.db'}"}})
    with pytest.raises(LungnodeError, match="no database at .*ln.db"):
        from node.cli import cmd_status

        cmd_status(argparse.Namespace(config=cfg, limit=5, json=False))
    assert main(["status", "--config", str(cfg)]) == 2
    assert not (tmp_path / "var" / "ln.db").exists()


def test_redacted_masks_database_password() -> None:
    cfg = load_config(None, environ={"LUNGNODE_STORAGE__DATABASE_URL": "postgresql+psycopg://node:s3cret@db:5432/ln"})
    red = cfg.redacted()
    assert red["storage"]["database_url"] == "postgresql+psycopg://node:***@db:5432/ln"
    assert "s3cret" not in json.dumps(red)
    assert cfg.storage.database_url.endswith("s3cret@db:5432/ln")  # only the log copy is masked


# -- lungnode check-config -------------------------------------------------------------------------
def test_check_config_valid_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"dicom": {"port": 11120}})
    assert cli_main(["check-config", str(path)]) == 0
    assert f"{path}: valid" in capsys.readouterr().out


def test_check_config_invalid_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"storage": {"spool_dirr": "/x"}})
    assert cli_main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "storage.spool_dirr: unknown key" in err
    assert cli_main(["check-config", str(tmp_path / "absent.yaml")]) == 2


def test_check_config_show_includes_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"dicom": {"port": 11120},
                                            "storage": {"database_url": "postgresql://u:pw@db/ln"}})
    monkeypatch.setenv("LUNGNODE_DICOM__AE_TITLE", "ENVNODE")
    assert cli_main(["check-config", "--show", str(path)]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[out.index("{"):])
    assert shown["dicom"]["port"] == 11120
    assert shown["dicom"]["ae_title"] == "ENVNODE"
    assert shown["storage"]["database_url"] == "postgresql://u:***@db/ln"


def test_check_config_exit_codes_as_a_real_command(tmp_path: Path) -> None:
    good = write_yaml(tmp_path / "good.yaml", {"dicom": {"port": 11121, "allowed_callers": [{"ae_title": "PACS"}]}})
    bad = write_yaml(tmp_path / "bad.yaml", {"dicom": {"port": 99999}})
    ok = run_cli("check-config", good)
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    ko = run_cli("check-config", bad)
    assert ko.returncode == 2
    assert "dicom.port:" in ko.stderr
    env_bad = run_cli("check-config", good, env={"LUNGNODE_DICOM__PORT": "-1"})
    assert env_bad.returncode == 2
    assert "dicom.port:" in env_bad.stderr


@pytest.mark.skipif(not EXAMPLE.is_file(), reason=f"{EXAMPLE} does not exist yet")
def test_deploy_example_config_validates() -> None:
    cfg = load_config(EXAMPLE, environ={})
    assert cfg.dicom.port >= 1
    proc = run_cli("check-config", EXAMPLE)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not EXAMPLE.is_file(), reason=f"{EXAMPLE} does not exist yet")
def test_deploy_example_config_equals_the_embedded_defaults() -> None:
    """The file IT edits documents the defaults; a default changed in code must be changed there too."""
    assert load_config(EXAMPLE, environ={}).model_dump() == load_config(None, environ={}).model_dump()


def test_environment_sets_a_whole_top_level_section_and_ignores_foreign_variables() -> None:
    env = {"LUNGNODE_DESTINATIONS": "[{name: pacs, ae_title: PACS, host: 127.0.0.1, port: 4242}]",
           "LUNGNODE_HOME": "/somewhere"}  # not a section of ours: ignored, not an error
    cfg = load_config(None, environ=env)
    assert [(d.name, d.ae_title, d.port) for d in cfg.destinations] == [("pacs", "PACS", 4242)]
    with pytest.raises(ConfigError, match="destinations"):
        load_config(None, environ={"LUNGNODE_DESTINATIONS": "[{name: pacs}]"})


def test_every_setting_is_in_the_example_config() -> None:
    """The README promises that deploy/config.example.yaml documents every key: each setting of every section is
    there, set or commented out (destinations' keys are documented in its commented example)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    written = set(re.findall(r"^#?\s*#?\s*-?\s*([a-z_0-9]+):", text, flags=re.MULTILINE))
    written |= set(re.findall(r"[{,]\s*([a-z_0-9]+):", text))  # flow style: {min: 0.5, max: 5.0}
    for section in Config.model_fields:
        assert f"\n{section}:" in f"\n{text}" or section == "destinations", f"section {section} missing"

    def models_in(annotation: object) -> list[type[BaseModel]]:  # X, X | None, list[X]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    def missing_in(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for key, field in model.model_fields.items():
            if prefix and key not in written:
                out.append(f"{prefix}{key}")
            for sub in models_in(field.annotation):
                out += missing_in(sub, f"{prefix}{key}.")
        return out

    missing = missing_in(Config, "")
    assert missing == [], f"settings not in {EXAMPLE.name}: {missing}"


def test_commitment_port_may_not_be_the_dicom_port(tmp_path: Path) -> None:
    dest = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "storage_commitment": True}
    data = {"dicom": {"port": 11112}, "sending": {"commitment_port": 11112}, "destinations": [dest]}
    assert "sending.commitment_port 11112 is dicom.port" in _error(write_yaml(tmp_path / "c.yaml", data))
    data["sending"]["commitment_port"] = 11113
    load_config(write_yaml(tmp_path / "ok.yaml", data), environ={})


def test_check_config_names_a_model_folder_that_cannot_be_used(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """serve would start and analyse nothing (one ERROR line): check-config says so before. A warning, since the
    node still receives without models (the unit's ExecStartPre must not keep it from receiving); --strict: error."""
    path = write_yaml(tmp_path / "c.yaml", {"inference": {"lung_model": "lung_segx"}})
    assert cli_main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "inference:" in err and "lung_segx" in err
    assert f"lungnode models --config {path} verify" in err
    assert cli_main(["check-config", "--strict", str(path)]) == 2
    assert "lung_segx" in capsys.readouterr().err
    role = write_yaml(tmp_path / "r.yaml", {"inference": {"diagnosis_model": "lung_seg"}})
    assert cli_main(["check-config", "--strict", "--config", str(role)]) == 2  # --config, as other commands take it
    assert "the diagnosis step needs a classification model" in capsys.readouterr().err
    receive_only = write_yaml(tmp_path / "w.yaml", {"inference": {"lung_model": "lung_segx"}, "workers": {"count": 0}})
    assert cli_main(["check-config", "--strict", "--config", str(receive_only)]) == 0  # its workers run elsewhere
    assert "warning" not in capsys.readouterr().err
    assert cli_main(["check-config"]) == 2


def test_allowed_callers_may_be_bare_ae_titles(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"dicom": {"allowed_callers": ["PACS", {"ae_title": "CT1",
                                                                                          "host": "10.0.0.5"}]}}))
    assert cfg.dicom.allowed_callers == [AllowedCaller(ae_title="PACS"), AllowedCaller(ae_title="CT1", host="10.0.0.5")]
    assert _error(write_yaml(tmp_path / "bad.yaml", {"dicom": {"allowed_callers": ["WAY_TOO_LONG_AE_TITLE"]}}))


@pytest.mark.parametrize("address", ["pacs-lan", "10.0.0.300", "localhost"])
def test_a_bind_address_that_is_not_an_ip_address_is_named(tmp_path: Path, address: str) -> None:
    msg = _error(write_yaml(tmp_path / "c.yaml", {"dicom": {"bind_address": address}}))
    assert f"dicom.bind_address: Value error, '{address}' is not an IP address" in msg


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "127.0.0.1", "10.1.2.3", "fe80::1"])
def test_ip_addresses_are_accepted_as_bind_address(tmp_path: Path, address: str) -> None:
    assert load_config(write_yaml(tmp_path / "c.yaml", {"dicom": {"bind_address": address}})).dicom.bind_address \
        == address


def test_a_destination_that_would_receive_nothing_is_named(tmp_path: Path) -> None:
    data = {"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "objects": []}]}
    msg = _error(write_yaml(tmp_path / "c.yaml", data))
    assert "destinations[pacs].objects" in msg and "objects" in msg and "at least 1 item" in msg, msg


def test_check_config_warns_of_folders_the_node_could_not_write(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A spool or ledger folder that cannot be made (here: below a file; for another user, one without write
    permission) is said before the node starts and fails; a folder still to be made under a writable one is fine."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    path = write_yaml(tmp_path / "c.yaml", {"storage": {"spool_dir": str(blocker / "spool"),
                                                        "database_url": f"sqlite:///{tmp_path / 'new' / 'ln.db'}"}})
    assert cli_main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"storage.spool_dir: {blocker / 'spool'} cannot be created by this user" in err
    assert "storage.database_url" not in err, "its folder can be made"


# -- what YAML makes of what IT writes ------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("dicom:\n  port: yes\n", "dicom.port"),  # YAML 1.1: yes is true, which int() would take as 1
        ("workers:\n  count: yes\n", "workers.count"),
        ("destinations:\n  - {name: pacs, ae_title: PACS, host: 10.0.0.5, port: on}\n", "destinations[pacs].port"),
        ("selection:\n  max_study_age_days: true\n", "selection.max_study_age_days"),  # int | None
        ("assembly:\n  quiet_period_s: on\n", "assembly.quiet_period_s"),  # a float would take it as 1.0
    ],
)
def test_true_or_false_is_not_a_number(tmp_path: Path, text: str, key: str) -> None:
    msg = _error(write_yaml(tmp_path / "c.yaml", text))
    assert f"{key}: Value error, a number is needed, not true/false" in msg, msg


def test_numbers_from_the_environment_are_still_numbers() -> None:
    cfg = load_config(None, environ={"LUNGNODE_DICOM__PORT": "104", "LUNGNODE_WORKERS__COUNT": "2",
                                     "LUNGNODE_SELECTION__MAX_STUDY_AGE_DAYS": "30"})
    assert (cfg.dicom.port, cfg.workers.count, cfg.selection.max_study_age_days) == (104, 2, 30)
    assert "dicom.port:" in _error(None, {"LUNGNODE_DICOM__PORT": "true"})


def test_a_range_with_min_above_max_is_refused(tmp_path: Path) -> None:
    """min 5, max 1 would skip every series, silently."""
    msg = _error(write_yaml(tmp_path / "c.yaml", "selection:\n  slice_thickness_mm: {min: 5, max: 1}\n"))
    assert "selection.slice_thickness_mm: Value error, min 5 is above max 1" in msg, msg
    same = load_config(write_yaml(tmp_path / "ok.yaml", {"selection": {"slice_thickness_mm": {"min": 2, "max": 2}}}))
    assert (same.selection.slice_thickness_mm.min, same.selection.slice_thickness_mm.max) == (2, 2)


def test_one_bound_of_a_range_keeps_the_other_default(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"selection": {"slice_thickness_mm": {"min": 1}}}), environ={})
    assert (cfg.selection.slice_thickness_mm.min, cfg.selection.slice_thickness_mm.max) == (1.0, 5.0)
    cfg = load_config(None, environ={"LUNGNODE_SELECTION__SLICE_THICKNESS_MM__MAX": "3"})
    assert (cfg.selection.slice_thickness_mm.min, cfg.selection.slice_thickness_mm.max) == (0.5, 3.0)
    msg = _error(None, {"LUNGNODE_SELECTION__SLICE_THICKNESS_MM__MIN": "9"})  # above the default max
    assert "selection.slice_thickness_mm: Value error, min 9 is above max 5" in msg
    assert "LUNGNODE_SELECTION__SLICE_THICKNESS_MM__MIN" in msg


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mysql://node@db/ln", "SQLite or PostgreSQL, not mysql"),
        ("oracle://node@db/ln", "SQLite or PostgreSQL, not oracle"),
        ("postgres://node@db/ln", "spells it postgresql"),
        ("postgresql+asyncpg://node@db/ln", "asyncio driver"),
    ],
)
def test_a_database_the_node_cannot_use_is_refused_by_check_config(tmp_path: Path, url: str, words: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Before: valid for check-config, then serve failed at start for want of a driver."""
    path = write_yaml(tmp_path / "c.yaml", {"storage": {"database_url": url}})
    assert cli_main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "storage.database_url: Value error," in err and words in err, err
    assert "postgresql+psycopg://" in err  # what to use instead


def test_a_postgresql_driver_that_is_not_installed_is_named() -> None:
    import importlib.util

    if importlib.util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed here")
    msg = _error(None, {"LUNGNODE_STORAGE__DATABASE_URL": "postgresql+pg8000://node@db/ln"})
    assert "storage.database_url: Value error, the driver of postgresql+pg8000 cannot be loaded" in msg
    assert "pip install -e '.[postgres]'" in msg


def test_supported_databases_pass() -> None:
    for url in ("sqlite:///var/ln.db", "sqlite://", "postgresql://node@db/ln", "postgresql+psycopg://node:pw@db/ln"):
        assert load_config(None, environ={"LUNGNODE_STORAGE__DATABASE_URL": url}).storage.database_url == url


def test_sections_left_empty_mean_their_defaults(tmp_path: Path) -> None:
    """Every key of a section commented out leaves the section null in YAML: the same as leaving it out."""
    text = ("dicom:\n  ae_title: NODE\n  allowed_callers:\n  tls:\n    # enabled: true\n"
            "storage:\n  # spool_dir: /srv/spool\naudit:\n"
            "selection:\n  slice_thickness_mm:\n  series_description:\n"
            "inference:\n  slice_rule:\n"
            "destinations:\n#  - name: pacs\n")
    cfg = load_config(write_yaml(tmp_path / "c.yaml", text), environ={})
    defaults = Config()
    assert cfg.dicom.ae_title == "NODE"
    assert cfg.dicom.tls == defaults.dicom.tls and cfg.dicom.allowed_callers == []
    assert cfg.storage == defaults.storage and cfg.audit == defaults.audit
    assert cfg.selection == defaults.selection and cfg.inference.slice_rule == defaults.inference.slice_rule
    assert cfg.destinations == []


def test_an_empty_value_that_has_no_empty_meaning_is_named(tmp_path: Path) -> None:
    msg = _error(write_yaml(tmp_path / "c.yaml", "dicom:\n  port:\nselection:\n  modalities:\n"))
    assert "dicom.port: Value error, empty: give a value, or leave the key out for its default" in msg
    assert "selection.modalities: Value error, empty" in msg  # [] (none) or the default [CT]? IT says which


@pytest.mark.parametrize(
    ("text", "key", "read_as"),
    [
        ("dicom:\n  ae_title: 12345\n", "dicom.ae_title", "a number"),
        ("dicom:\n  ae_title: NO\n", "dicom.ae_title", "true/false"),
        ("dicom:\n  allowed_callers: [12345]\n", "dicom.allowed_callers.0.ae_title", "a number"),
        ("outputs:\n  device_serial_number: 12345\n", "outputs.device_serial_number", "a number"),
        ("audit:\n  source_id: 2024-01-05\n", "audit.source_id", "a date"),
    ],
)
def test_a_text_value_yaml_read_as_something_else_says_to_quote_it(tmp_path: Path, text: str, key: str,
                                                                    read_as: str) -> None:
    msg = _error(write_yaml(tmp_path / "c.yaml", text))
    field = key.rsplit(".", 1)[1]
    assert f"{key}: Value error, text is needed: quote the value in YAML ({field}: \"...\")" in msg, msg
    assert f"reads it as {read_as}" in msg
    quoted = text.replace("12345", "'12345'").replace("NO", "'NO'").replace("2024-01-05", "'2024-01-05'")
    load_config(write_yaml(tmp_path / "quoted.yaml", quoted), environ={})


def test_an_empty_ae_title_from_the_environment_says_what_an_ae_title_is() -> None:
    msg = _error(None, {"LUNGNODE_DICOM__AE_TITLE": ""})
    assert "dicom.ae_title: Value error, an AE title is 1 to 16 printable characters" in msg
    assert "(set by environment variable LUNGNODE_DICOM__AE_TITLE)" in msg
    assert load_config(None, environ={"LUNGNODE_AUDIT__HOST": ""}).audit.host is None  # '' unsets optional keys


# -- errors caused by environment variables name them ---------------------------------------------
def test_an_unknown_section_from_the_environment_names_the_variable() -> None:
    msg = _error(None, {"LUNGNODE_DICMO__PORT": "104"})
    assert "dicmo: unknown key (did you mean dicom?) (from environment variable LUNGNODE_DICMO__PORT)" in msg, msg


def test_a_section_the_environment_made_invalid_names_the_variable(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The error is the TLS section's (enabled without certificate), the cause a variable that set a key in it."""
    path = write_yaml(tmp_path / "c.yaml", {"dicom": {"port": 11120}})
    monkeypatch.setenv("LUNGNODE_DICOM__TLS__ENABLED", "true")
    assert cli_main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "dicom.tls: Value error, enabled: true needs certificate and private_key" in err
    assert "(from environment variable LUNGNODE_DICOM__TLS__ENABLED)" in err, err
    msg = _error(path, {"LUNGNODE_DICMO__PORT": "1", "LUNGNODE_DICOM__PORT": "x"})
    assert "dicom.port:" in msg and "LUNGNODE_DICMO__PORT" not in msg.split("dicom.port:")[1].splitlines()[0]


# -- check-config and the log file ----------------------------------------------------------------
def test_check_config_refuses_a_log_file_the_node_could_not_open(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """serve stops at once on such a log file: check-config (the unit's ExecStartPre) must say so with exit 2, not a
    warning. A path below a regular file fails for every user, root included."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    log_file = blocker / "node.log"
    path = write_yaml(tmp_path / "c.yaml", {"logging": {"file": str(log_file)}})
    assert cli_main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"logging.file: {log_file} cannot be created by this user ({blocker} is not a folder)" in err, err
    a_folder = write_yaml(tmp_path / "d.yaml", {"logging": {"file": str(tmp_path)}})  # the file is a folder
    assert cli_main(["check-config", str(a_folder)]) == 2
    assert f"logging.file: {tmp_path} cannot be written" in capsys.readouterr().err
    fine = write_yaml(tmp_path / "ok.yaml", {"logging": {"file": str(tmp_path / "new" / "node.log")}})
    assert cli_main(["check-config", str(fine)]) == 0  # a folder still to be made under a writable one
    assert "logging.file" not in capsys.readouterr().err
