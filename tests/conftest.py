"""Shared fixtures: free ports, a real ``lungnode serve`` subprocess, dcmtk peers, test series."""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.config import Config
from node.db.ingest import IngestLedger
from node.db.session import make_engine, make_sessionmaker, upgrade_schema
from tests.helpers.certs import Pki, have_openssl, make_pki
from tests.helpers.dcmtk import have_dcmtk
from tests.helpers.net import free_port
from tests.helpers.node_proc import REPO, NodeProcess

if TYPE_CHECKING:
    from node.send.sender import Sender

SHARED_DATA = REPO.parent / "shared" / "data"  # ../shared/data next to the checkout
LIDC_0001 = SHARED_DATA / "lidc-idri-0001-ct.tar.xz"

NodeFactory = Callable[..., NodeProcess]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (the README's test command: ``-n 2 --dist loadgroup``) the integration tests run one after
    another in one worker, as without it: they time real peers and kill nodes mid-transfer, and two of them at once
    on a 2-core machine would disturb each other. The unit tests run beside them, in the other worker."""
    for item in items:
        if item.nodeid.startswith("tests/integration/"):
            item.add_marker(pytest.mark.xdist_group("integration"))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A real SQLite ledger in tmp_path, migrated to the newest schema."""
    eng = make_engine(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    upgrade_schema(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


@pytest.fixture
def ledger(sessions: sessionmaker[Session]) -> IngestLedger:
    return IngestLedger(sessions)


@pytest.fixture
def port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_port()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """Start nodes: ``node_factory(name="node", settings={...}, env={...}, start=True)``.

    Each node gets its own folder under tmp_path (config.yaml, spool/, ledger.sqlite, node.log).
    At teardown every node still running gets SIGTERM and must exit 0.
    """
    nodes: list[NodeProcess] = []

    def make(name: str = "node", *, settings: dict[str, Any] | None = None, env: dict[str, str] | None = None,
             port: int | None = None, start: bool = True) -> NodeProcess:
        node = NodeProcess(tmp_path / name, port=port, settings=settings, env=env)
        nodes.append(node)
        if start:
            node.start()
        return node

    yield make
    problems = []
    for node in nodes:
        if node.running:
            rc = node.stop()
            if rc != 0:
                problems.append(f"{node.workdir.name}: exit code {rc} after SIGTERM\n{node.log[-3000:]}")
    assert not problems, "\n".join(problems)


@pytest.fixture
def node(node_factory: NodeFactory) -> NodeProcess:
    """A running node with the test defaults (quiet period 2 s, release grace 0.5 s, any caller)."""
    return node_factory()


@pytest.fixture(scope="session")
def require_dcmtk() -> None:
    if not have_dcmtk("storescu", "echoscu", "dcmdump"):
        pytest.skip("dcmtk (/usr/bin/storescu, echoscu, dcmdump) is not installed")


@pytest.fixture(scope="session")
def lidc_0001(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LIDC-IDRI-0001 CT series extracted once per session; the folder holding its .dcm files."""
    if not LIDC_0001.is_file():
        pytest.skip(f"real CT data not available: {LIDC_0001} is absent")
    out = tmp_path_factory.mktemp("lidc-0001")
    with tarfile.open(LIDC_0001) as tar:
        tar.extractall(out, filter="data")
    return out


@pytest.fixture
def sender_factory(sessions: sessionmaker[Session]) -> Iterator[Callable[[Config], Sender]]:
    """Start result senders on the test's ledger: ``sender_factory(config)``; all stopped at the end."""
    from node.send.sender import Sender

    senders: list[Sender] = []

    def make(config: Config) -> Sender:
        senders.append(Sender(config, sessions))
        senders[-1].start()
        return senders[-1]

    yield make
    for sender in senders:
        sender.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test PKI (hospital CA, node and caller certificates, a stranger CA) made with the openssl command."""
    if not have_openssl():
        pytest.skip("the openssl command is not installed (Debian package openssl)")
    return make_pki(tmp_path_factory.mktemp("pki"))
