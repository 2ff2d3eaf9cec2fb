"""Node configuration: embedded defaults, then one YAML file, then environment variables.

The model is strict on purpose: an unknown key or a bad value stops start-up with a message
that names the key (``dicom.port: Input should be less than or equal to 65535``), because a
typo in a hospital's config must not be silently ignored. So is what YAML makes of an unquoted value: ``port: yes``
(true) or ``ae_title: 12345`` (a number) is refused with the fix; a section whose keys are all commented out
(null in YAML) means its defaults, as if left out.

Environment overrides use ``LUNGNODE_<SECTION>__<KEY>`` (double underscore between levels; a whole
section as ``LUNGNODE_<SECTION>``, e.g. ``LUNGNODE_DESTINATIONS='[{name: pacs, ...}]'``),
e.g. ``LUNGNODE_DICOM__PORT=11113`` or ``LUNGNODE_STORAGE__DATABASE_URL=postgresql+psycopg://...``.
Scalar values are taken as text and converted by the model (``11113``, ``true``); lists and
mappings are written in YAML flow style: ``LUNGNODE_DICOM__ALLOWED_CALLERS='[{ae_title: PACS}]'``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticUndefined

from node.errors import ConfigError
from node.yamlfile import did_you_mean, read_yaml_mapping

ENV_PREFIX = "LUNGNODE_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash, no controls


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value):
        raise ValueError("an AE title is 1 to 16 printable characters without backslash")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae)]


def _kinds(annotation: Any) -> set[Any]:
    """The plain types a field admits: ``int | None`` -> {int, NoneType}, ``list[str]`` -> {list}."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    out: set[Any] = set()
    for arg in args:
        if typing.get_origin(arg) is Annotated:
            arg = typing.get_args(arg)[0]
        out.add(typing.get_origin(arg) or arg)
    return out


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_values(cls, value: Any, info: ValidationInfo) -> Any:
        """What YAML makes of what IT writes: ``port: yes`` is true, ``ae_title: 12345`` a number, a section whose
        keys are all commented out null. Refused with the fix, or (an empty section) taken as left out."""
        field = cls.model_fields[str(info.field_name)]
        kinds = _kinds(field.annotation)
        if value is None and type(None) not in kinds:
            if str in kinds:  # LUNGNODE_DICOM__AE_TITLE='' is an empty text: the field says what it needs
                return ""
            default = field.get_default(call_default_factory=True)
            if any(isinstance(k, type) and issubclass(k, BaseModel) for k in kinds):
                return {} if default is PydanticUndefined else default  # an empty section: its defaults
            if isinstance(default, (list, dict)) and not default:
                return default  # destinations: with every entry commented out
            raise ValueError("empty: give a value, or leave the key out for its default")
        if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError("a number is needed, not true/false (YAML reads yes, no, on and off as true/false)")
        if isinstance(value, (bool, int, float, datetime.date)) and str in kinds and not kinds & {bool, int, float}:
            read = ("true/false" if isinstance(value, bool) else "a date" if isinstance(value, datetime.date)
                    else "a number")
            raise ValueError(f"text is needed: quote the value in YAML ({info.field_name}: \"...\"); unquoted, YAML "
                             f"reads it as {read}")
        return value


def _host(value: str) -> str:
    """A host name or IP address: an empty one would make the socket layer pick this machine."""
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,253}", value):
        raise ValueError(f"{value!r} is not a host name or IP address (e.g. pacs.hospital.local or 10.0.0.5)")
    return value


Host = Annotated[str, AfterValidator(_host)]


def _ip(value: str) -> str:
    """An IP address, written the way the caller's address will be compared (host names are not resolved)."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address: the caller's address is compared as it is, host names "
                         "are not resolved (write e.g. 10.0.0.5)") from None


IPAddress = Annotated[str, AfterValidator(_ip)]


class AllowedCaller(Strict):
    """A calling AE title that may associate, optionally only from one host address."""

    ae_title: AETitle
    host: IPAddress | None = Field(default=None, description="IP address the caller must come from; any when unset")
    certificate_cn: str | None = Field(
        default=None, description="with dicom.tls: common name the caller's certificate must carry; any when unset"
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_title(cls, data: Any) -> Any:
        """``allowed_callers: [PACS, CT1]``: a bare AE title is a caller from any host, as an admin would write it."""
        # a number or true/false too, for the ae_title field to say what to quote
        return {"ae_title": data} if isinstance(data, (str, int, float)) else data


def _existing_file(path: Path | None) -> Path | None:
    if path is not None and not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


PemFile = Annotated[Path, AfterValidator(_existing_file)]


def _cipher_list(value: str) -> str:
    """An OpenSSL cipher list that selects at least one suite (checked here, not at the first handshake)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(value)
    except ssl.SSLError:
        raise ValueError(f"{value!r} selects no cipher suite OpenSSL knows (an OpenSSL cipher list, e.g. "
                         "'ECDHE+AESGCM:ECDHE+AES')") from None
    return value


CipherList = Annotated[str, AfterValidator(_cipher_list)]
_CIPHERS_HELP = ("OpenSSL cipher list for TLS 1.2; null: forward-secret AEAD suites only (BCP 195). Widen it only "
                 "for a peer that offers nothing better, e.g. 'ECDHE+AESGCM:ECDHE+AES'")


class TlsSettings(Strict):
    """DICOM over TLS on the node's listeners (images in, storage commitment reports): TLS 1.2 or later."""

    enabled: bool = Field(default=False, description="listen with TLS only (dicom.port and sending.commitment_port)")
    certificate: PemFile | None = Field(default=None, description="PEM certificate (chain) the node presents")
    private_key: PemFile | None = Field(default=None, description="PEM private key of that certificate, unencrypted")
    ca_certificates: PemFile | None = Field(
        default=None, description="PEM CA bundle; when set, callers must present a certificate signed by one of these"
    )
    crl: PemFile | None = Field(
        default=None, description="PEM revocation list(s) of those CAs: a revoked caller certificate is refused"
    )
    ciphers: CipherList | None = Field(default=None, description=_CIPHERS_HELP)

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("enabled: true needs certificate and private_key")
        if self.crl is not None and self.ca_certificates is None:
            raise ValueError("crl needs ca_certificates (revocation applies to the callers' certificates)")
        return self


class DicomSettings(Strict):
    ae_title: AETitle = "LUNGNODE"
    bind_address: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    allowed_callers: list[AllowedCaller] = Field(
        default_factory=list, description="empty: any caller is accepted"
    )
    require_called_ae_title: bool = True
    max_associations: int = Field(default=8, ge=1, le=256)
    max_pdu_size: int = Field(
        default=1048576,
        ge=0,
        description="largest P-DATA PDU we accept, in bytes; 0 means unlimited",
    )
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    stop_drain_s: float = Field(
        default=20.0, ge=0, description="at stop, how long transfers in progress may go on (new associations are "
        "refused meanwhile) before the associations still open are aborted; one idle for 1 s is ended at once")
    tcp_nodelay: bool = True
    fast_receive: bool = Field(
        default=True, description="use the tuned pynetdicom receive path (node/receive/tuning.py)"
    )
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @model_validator(mode="after")
    def _certificate_needs_tls(self) -> DicomSettings:
        if any(c.certificate_cn for c in self.allowed_callers) and not (self.tls.enabled and self.tls.ca_certificates):
            raise ValueError("allowed_callers[].certificate_cn needs dicom.tls enabled with ca_certificates "
                             "(only then do callers present a verified certificate)")
        return self

    @field_validator("bind_address")
    @classmethod
    def _an_address(cls, v: str) -> str:
        if v:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address: use 0.0.0.0 (all interfaces), :: (all, IPv6 too) or "
                                 "the address of one of this machine's interfaces (names are not resolved)") from None
        return v

    @field_validator("max_pdu_size")
    @classmethod
    def _pdu(cls, v: int) -> int:
        if v != 0 and v < 4096:
            raise ValueError("must be 0 (unlimited) or at least 4096 bytes")
        return v


class StorageSettings(Strict):
    spool_dir: Path = Path("./var/spool")
    database_url: str = "sqlite:///./var/lungnode.db"
    min_free_disk_mb: int = Field(
        default=1024, ge=0, description="below this free space C-STORE answers 0xA700 (out of resources)"
    )
    fsync: bool = Field(default=True, description="fsync every instance before acknowledging it")

    @field_validator("database_url")
    @classmethod
    def _is_a_url(cls, url: str) -> str:
        """A database the node runs on, with its driver installed: else serve would fail only at start."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        use = "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ValueError(f"not a database URL: {use}") from None
        backend = parsed.get_backend_name()
        if backend == "postgres":
            raise ValueError(f"SQLAlchemy spells it postgresql, not postgres: {use}")
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"lungnode keeps its ledger in SQLite or PostgreSQL, not {backend}: {use}")
        try:
            dialect = parsed.get_dialect()
        except NoSuchModuleError:
            raise ValueError(f"{parsed.drivername} is not a database driver SQLAlchemy knows: {use}") from None
        if dialect.is_async:
            raise ValueError(f"{parsed.drivername} is an asyncio driver, which the node cannot use: {use}")
        if backend == "postgresql":
            try:
                dialect.import_dbapi()
            except ImportError as exc:
                raise ValueError(f"the driver of {parsed.drivername} cannot be loaded ({exc}): install psycopg "
                                 "(.venv/bin/pip install -e '.[postgres]') and use postgresql+psycopg://USER@HOST/DB"
                                 ) from None
        return url


class AssemblySettings(Strict):
    quiet_period_s: float = Field(default=60.0, gt=0, description="no new instance for this long: series complete")
    release_grace_s: float = Field(
        default=2.0, ge=0, description="after the carrying associations were released: complete this much sooner"
    )
    poll_interval_s: float = Field(default=0.5, gt=0)
    study_settle_s: float = Field(
        default=5.0, ge=0, description="a series is analysed only once its study received no image for this long "
        "and none of its CT series is still being received, so the best series of the study is chosen among all")
    priority_by_caller: dict[AETitle, Literal["high", "medium", "low"]] = Field(
        default_factory=dict,
        description="calling AE titles whose series are analysed before (high) or after (low) the others, e.g. "
        "{ED_CT: high, RESEARCH: low}; a series from any other caller is high when its images came with C-STORE "
        "Priority HIGH, else medium")
    low_priority_max_wait_s: float = Field(
        default=3600.0, ge=0, description="a low-priority job that has waited this long is taken as medium (never as "
        "high), so that a steady flow of routine studies cannot hold a low-priority backlog back for ever; 0: never")


class PatternRule(Strict):
    """Regular expressions (Python syntax, searched anywhere in the value)."""

    include: list[str] = Field(default_factory=list, description="when set, the value must match one")
    exclude: list[str] = Field(default_factory=list, description="the value must match none")

    @field_validator("include", "exclude")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {p!r}: {exc}") from exc
        return patterns


class Range(Strict):
    """Slice thickness in mm; each bound has its default, so that one of them can be given alone."""

    min: float = Field(default=0.5, ge=0)
    max: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min > self.max:  # nothing lies between: every series would be skipped
            raise ValueError(f"min {self.min:g} is above max {self.max:g}: give min <= max")
        return self


class SelectionSettings(Strict):
    """Which series of a study are analysed (header rules), and which one wins."""

    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    image_type_required: list[str] = Field(
        default_factory=lambda: ["ORIGINAL"],
        description="values ImageType must hold (ORIGINAL: no reformats, projections or other derived images)",
    )
    image_type_excluded: list[str] = Field(
        default_factory=lambda: ["LOCALIZER"],
        description="values ImageType must not hold (scout views)",
    )
    axial_tolerance_deg: float = Field(default=10.0, ge=0, le=45)
    slice_thickness_mm: Range = Field(default_factory=Range)
    min_slices: int = Field(default=40, ge=2)
    series_description: PatternRule = Field(
        default_factory=lambda: PatternRule(
            exclude=[r"(?i)scout|topogram|localizer|surview|dose\s*(report|info|summary)|mip|minip|\bcor(onal)?\b|\bsag(ittal)?\b|\b3d\b|report"]
        )
    )
    body_part: PatternRule = Field(
        default_factory=lambda: PatternRule(exclude=[r"(?i)^(head|brain|neck|abdomen|pelvis|extremity|knee|ankle|foot|hand)$"])
    )
    convolution_kernel: PatternRule = Field(default_factory=PatternRule)
    max_study_age_days: int | None = Field(
        default=None, ge=0, description="analyse only studies at most this many days old by their Study Date (a PACS "
        "that forwards prior studies with a new one does not get the priors analysed); null: any age")
    prefer_kernel: list[str] = Field(
        default_factory=lambda: [r"(?i)lung|^b[67]\d|^br6|^bl\d|^i70|^fc(5[0-9]|8[0-9])|^y[a-d]$|^l$|sharp"],
        description="kernels preferred when a study has several candidate series (lung/sharp kernels)",
    )


class SliceRuleSettings(Strict):
    """The per-series decision from per-slice lesion evidence, reported beside the 3D model's probabilities.

    Slices are taken from the lung apex (head) to the base (tail) over the slices that hold lung;
    the first ``head_skip`` and last ``tail_skip`` fractions are ignored (apical partial volume and
    the diaphragm domes give false lesion evidence). A slice is abnormal when its lesion area is at
    least ``min_lesion_percent`` of its lung area and ``min_lesion_mm2``; the series is called
    pneumonia when the abnormal share of the considered slices reaches ``min_share``.
    """

    head_skip: float = Field(default=0.10, ge=0, lt=0.5, description="fraction of lung slices ignored at the apex")
    tail_skip: float = Field(default=0.14, ge=0, lt=0.5, description="fraction of lung slices ignored at the base")
    min_share: float = Field(default=0.20, gt=0, le=1, description="abnormal share of the considered slices for a positive call")
    min_lesion_percent: float = Field(default=1.0, ge=0, le=100, description="lesion area as % of the slice's lung area")
    min_lesion_mm2: float = Field(default=20.0, ge=0, description="lesion area (mm2) a slice needs to count as abnormal")


class InferenceSettings(Strict):
    """Where models come from and what runs them."""

    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto: CUDA when onnxruntime has it and a GPU answers, else CPU; cpu; cuda or cuda:N",
    )
    threads: int = Field(default=0, ge=0, description="CPU threads per model session; 0 = all cores")
    models_dir: Path = Field(default=Path(__file__).resolve().parent.parent / "models")
    lung_model: str = "lung_seg"
    lesion_model: str = "lesion_seg"
    diagnosis_model: str = "diagnosis"
    slice_rule: SliceRuleSettings = Field(default_factory=SliceRuleSettings)


class WorkerSettings(Strict):
    count: int = Field(default=1, ge=0, le=64, description="worker processes started by `lungnode serve` (0: none)")
    lease_s: float = Field(default=120.0, gt=0, description="a running job without heartbeat this long goes back to the queue")
    max_attempts: int = Field(default=3, ge=1)
    poll_interval_s: float = Field(default=1.0, gt=0)
    max_job_s: float = Field(default=1800.0, ge=0, description="a job still running after this long (an analysis "
                             "that hangs) is failed with that reason and its worker process restarted, so one bad "
                             "series cannot hold a worker for ever; `lungnode reanalyse JOB` runs it again. 0: no limit")
    models_recheck_s: float = Field(default=60.0, gt=0, description="while the models fail their checks (analysis "
                                    "disabled), check them again this often; workers start once they pass")


OutputKind = Literal["seg", "sr", "key_image", "kos"]
_ALL_KINDS: tuple[OutputKind, ...] = ("seg", "sr", "key_image", "kos")


class DestinationTls(Strict):
    """DICOM over TLS to one destination: whom to trust, and our certificate if it asks for one."""

    ca_certificates: PemFile = Field(description="PEM CA bundle that signed the destination's certificate")
    certificate: PemFile | None = Field(default=None, description="PEM certificate we present, if the destination asks")
    private_key: PemFile | None = Field(default=None, description="PEM private key of that certificate, unencrypted")
    check_hostname: bool = Field(default=True, description="the destination's certificate must name its host")
    crl: PemFile | None = Field(
        default=None, description="PEM revocation list of that CA: a revoked destination certificate is refused"
    )
    ciphers: CipherList | None = Field(default=None, description=_CIPHERS_HELP)

    @model_validator(mode="after")
    def _pair(self) -> DestinationTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class _Receiver(Strict):
    """What every destination has, however results reach it: the name the outbox keys on, and what it gets."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    objects: list[OutputKind] = Field(
        default_factory=lambda: list(_ALL_KINDS), min_length=1,
        description="which result objects this destination receives (e.g. [key_image] for viewers without SEG support)",
    )
    reject_replaced: bool = Field(
        default=False,
        description="when a later analysis of a series replaces results this destination received (late images, "
                    "lungnode reanalyse), send it an IHE IOCM rejection note for them: a KOS titled Rejected for "
                    "Quality Reasons (DCM 113001), which an archive supporting IOCM acts on by hiding the replaced "
                    "objects; leave off for archives without IOCM, which would file the note as one more document",
    )


class Destination(_Receiver):
    """A DICOM node results are sent to by C-STORE (used by the sender)."""

    ae_title: AETitle
    host: Host
    port: int = Field(ge=1, le=65535)
    storage_commitment: bool = Field(
        default=False, description="ask for storage commitment; a sent object counts as delivered once confirmed"
    )
    calling_ae_title: AETitle | None = Field(
        default=None, description="AE title we call from; default dicom.ae_title"
    )
    tls: DestinationTls | None = Field(default=None, description="send over TLS (DICOM TLS port, often 2762)")


class AuditSettings(Strict):
    """IHE ATNA audit messages (DICOM PS3.15 A.5 XML in RFC 5424 syslog) to the hospital's audit record repository."""

    host: Host | None = Field(default=None, description="the audit repository; null: no audit messages are sent")
    port: int = Field(default=6514, ge=1, le=65535, description="6514: syslog over TLS; 514: UDP or TCP")
    transport: Literal["tls", "tcp", "udp"] = Field(
        default="tls", description="tls (RFC 5425, as ATNA asks), tcp (RFC 6587 octet counting) or udp (RFC 5426)"
    )
    tls: DestinationTls | None = Field(default=None, description="with transport tls: whom to trust, our certificate")
    source_id: str | None = Field(default=None, min_length=1, max_length=64,
                                  description="AuditSourceID; default dicom.ae_title")
    enterprise_site_id: str | None = Field(default=None, min_length=1, max_length=64,
                                           description="AuditEnterpriseSiteID (the hospital), if the repository wants it")
    queue_size: int = Field(default=10000, ge=10, description="messages kept while the repository cannot be reached")
    timeout_s: float = Field(default=10.0, gt=0, description="connecting and writing to the repository")

    @model_validator(mode="after")
    def _tls_given(self) -> AuditSettings:
        if self.host is not None and self.transport == "tls" and self.tls is None:
            raise ValueError("transport tls needs tls.ca_certificates (the CA of the repository's certificate); "
                             "or choose transport tcp or udp")
        return self


def _web_url(value: str) -> str:
    parts = urlsplit(value)
    if "@" in parts.netloc:  # checked first: the messages below quote the url
        raise ValueError("put no user or password in the url (they would appear in logs and audit messages): use "
                         "username with password_file, or token_file")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{value!r} is not the http(s) URL of a DICOMweb service (e.g. "
                         "https://pacs.hospital.example/dicom-web)")
    return value.rstrip("/")


WebURL = Annotated[str, AfterValidator(_web_url)]
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class WebDestination(_Receiver):
    """A DICOMweb service results are sent to by STOW-RS (PS3.18 10.5), instead of C-STORE."""

    url: WebURL = Field(description="the DICOMweb root; objects are POSTed to URL/studies")
    username: str | None = Field(default=None, min_length=1, description="HTTP Basic user, with password_file")
    password_file: PemFile | None = Field(default=None, description="file holding the HTTP Basic password")
    token_file: PemFile | None = Field(default=None, description="file holding a bearer token (read at each send)")
    ca_certificates: PemFile | None = Field(default=None, description="https: PEM CA bundle; null: the system's")
    certificate: PemFile | None = Field(default=None, description="https: PEM certificate we present, if asked")
    private_key: PemFile | None = Field(default=None, description="https: PEM private key of that certificate")
    check_hostname: bool = Field(default=True, description="https: the server's certificate must name its host")

    @model_validator(mode="after")
    def _consistent(self) -> WebDestination:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        if self.username is not None and self.token_file is not None:
            raise ValueError("give username/password_file or token_file, not both")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        parts = urlsplit(self.url)
        if parts.scheme == "http":
            if any(v is not None for v in (self.ca_certificates, self.certificate, self.private_key)):
                raise ValueError("ca_certificates, certificate and private_key need an https url")
            if (self.username or self.token_file) and parts.hostname not in _LOOPBACK:
                raise ValueError("credentials over plain http would cross the network readable: use an https url")
        return self


def _destination_kind(value: Any) -> str:
    """A destination with a url is a DICOMweb one; any other a DICOM (C-STORE) one."""
    if isinstance(value, dict):
        return "dicomweb" if "url" in value else "dicom"
    return "dicomweb" if isinstance(value, WebDestination) else "dicom"


AnyDestination = Annotated[
    Annotated[Destination, Tag("dicom")] | Annotated[WebDestination, Tag("dicomweb")], Discriminator(_destination_kind)
]


class SendingSettings(Strict):
    """How results are sent to the destinations: retries with exponential backoff, then failed."""

    retry_base_s: float = Field(default=10.0, gt=0, description="delay before the first retry")
    retry_factor: float = Field(default=2.0, ge=1, description="each further retry waits this many times longer")
    retry_max_delay_s: float = Field(default=900.0, gt=0, description="longest wait between two attempts")
    max_attempts: int = Field(default=24, ge=1, description="attempts before an object is marked failed (the "
                              "defaults keep trying for about 4.5 hours: a PACS maintenance window)")
    batch_size: int = Field(default=100, ge=1, le=1000, description="objects sent in one association at most")
    poll_interval_s: float = Field(default=1.0, gt=0, description="how often the sender looks for due objects")
    connect_timeout_s: float = Field(default=15.0, gt=0,
                                     description="TCP connect, TLS handshake and association negotiation")
    response_timeout_s: float = Field(
        default=120.0, gt=0, description="wait for each answer of the destination (a C-STORE response, say): a PACS "
        "busy filing a large SEG may take long; past it the association is aborted and the objects retried")
    commitment_port: int = Field(
        default=11113, ge=0, le=65535,
        description="port (on dicom.bind_address) where storage commitment reports are received; 0: any free port",
    )
    commitment_timeout_s: float = Field(
        default=600.0, gt=0, description="a commitment report not received this long after the request: retry"
    )


class RetentionSettings(Strict):
    received_days: float = Field(
        default=7.0, ge=0, description="delete received images (and, once every destination has them, their results) this "
        "many days after their series completed; a series still being analysed is kept; 0 keeps everything"
    )
    check_interval_s: float = Field(default=3600.0, gt=0, description="a retention pass at start, then this often")
    identifiers_days: float | None = Field(
        default=None, ge=0, description="blank the Patient ID and accession number the ledger keeps for a study this "
        "many days after retention deleted the last of its images (its UIDs, states and times stay: the node's "
        "history); null: keep them")


class LoggingSettings(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Path | None = None
    include_phi: bool = Field(default=False, description="never enable outside a test system")


#: A DICOM LO value (Series Description): 1 to 64 characters, no backslash or control characters.
DicomLO = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\\\x00-\x1f]+$")]


class OutputsSettings(Strict):
    """The DICOM objects written for each analysis (DICOM SEG, TID 1500 SR, key images)."""

    seg: bool = Field(default=True, description="write the DICOM Segmentation")
    sr: bool = Field(default=True, description="write the TID 1500 Measurement Report")
    key_images: bool = Field(default=True, description="write Secondary Capture key images")
    seg_encoding: Literal["binary", "fractional_jpeg_ls"] = Field(
        default="binary",
        description="binary: BINARY, empty frames omitted; fractional_jpeg_ls: FRACTIONAL, JPEG-LS lossless (smaller)",
    )
    seg_series_number: int = Field(default=9701, ge=1, le=2**31 - 1)
    seg_series_description: DicomLO = "Lungs and lesions (lungnode, not for clinical use)"
    sr_series_number: int = Field(default=9702, ge=1, le=2**31 - 1)
    sr_series_description: DicomLO = "Lung CT measurements (lungnode, not for clinical use)"
    key_image_series_number: int = Field(default=9703, ge=1, le=2**31 - 1)
    key_image_series_description: DicomLO = "Key images (lungnode, not for clinical use)"
    key_image_count: int = Field(default=3, ge=1, le=12, description="most involved slices shown as key images")
    kos: bool = Field(default=True, description="write a Key Object Selection flagging the key images' source slices "
                      "(series with lesions only)")
    kos_series_number: int = Field(default=9704, ge=1, le=2**31 - 1)
    kos_series_description: DicomLO = "Key slices (lungnode, not for clinical use)"
    rejection_series_number: int = Field(
        default=9705, ge=1, le=2**31 - 1,
        description="series of the IOCM rejection notes sent to destinations with reject_replaced")
    rejection_series_description: DicomLO = "Replaced lungnode results withdrawn"
    sr_for_skipped_series: bool = Field(
        default=False,
        description="also write an SR for series the selection rules skip (scouts, other reconstructions); "
        "series refused by the QA checks always get one",
    )
    sr_template: str = Field(
        default="lung_ct_pneumonia", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="name of the SR template (sr_templates/<name>.yaml, or one in sr_templates_dir)",
    )
    sr_templates_dir: Path | None = Field(
        default=None, description="folder with your own SR templates; null: the templates shipped with the node"
    )
    device_serial_number: str = Field(default="1", min_length=1, max_length=64, description="DICOM Device Serial Number")

    @model_validator(mode="after")
    def _template_loads(self) -> OutputsSettings:
        # A bad SR template must stop start-up (and check-config), naming the file and the field.
        if self.sr:
            from node.outputs.sr_template import TemplateError, load_template

            try:
                load_template(self.sr_template, self.sr_templates_dir)
            except TemplateError as exc:
                raise ValueError(str(exc)) from None
        return self


class Config(Strict):
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    destinations: list[AnyDestination] = Field(default_factory=list)
    sending: SendingSettings = Field(default_factory=SendingSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    outputs: OutputsSettings = Field(default_factory=OutputsSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, dests: list[AnyDestination]) -> list[AnyDestination]:
        names = [d.name for d in dests]
        if len(set(names)) != len(names):  # the outbox keys every send on the destination's name
            raise ValueError(f"destination names must be unique: {', '.join(sorted(names))}")
        return dests

    @model_validator(mode="after")
    def _commitment_port_is_free(self) -> Config:
        # Both listen on dicom.bind_address: the second would fail at start-up; say it here (check-config too).
        committing = any(isinstance(d, Destination) and d.storage_commitment for d in self.destinations)
        if committing and self.sending.commitment_port != 0 and self.sending.commitment_port == self.dicom.port:
            raise ValueError(f"sending.commitment_port {self.sending.commitment_port} is dicom.port: the storage "
                             "commitment listener needs a port of its own (or 0 for any free port)")
        return self

    def redacted(self) -> dict[str, Any]:
        """The effective configuration for the start-up log, with secrets in URLs masked."""
        data = self.model_dump(mode="json")
        data["storage"]["database_url"] = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", self.storage.database_url)
        return data


def _env_overrides(environ: dict[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The overrides as a tree, and which variable set each path (so an error can name the variable)."""
    tree: dict[str, Any] = {}
    names: dict[tuple[str, ...], str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if len(path) == 1 and path[0] not in Config.model_fields:  # e.g. LUNGNODE_DESTINATIONS; others are not ours
            section = next((f for f in Config.model_fields if path[0].startswith(f + "_")), None)
            if section is not None:  # LUNGNODE_DICOM_PORT: a typo that would otherwise change nothing, silently
                key = path[0][len(section) + 1:].upper()
                raise ConfigError(f"environment variable {name}: section and key are separated by two underscores: "
                                  f"{ENV_PREFIX}{section.upper()}__{key}")
            continue
        names[tuple(path)] = name
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if raw == "":
            node[path[-1]] = None
        elif raw.lstrip()[:1] in ("[", "{"):  # lists and mappings are written in YAML flow style
            try:
                node[path[-1]] = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(f"environment variable {name}: not a valid YAML list or mapping ({exc})") from exc
        else:  # scalars stay strings (an AE title "1234" or "NO"); the model converts numbers and booleans
            node[path[-1]] = raw
    return tree, names


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_error(exc: ValidationError, source: str, env_names: dict[tuple[str, ...], str],
                  data: dict[str, Any] | None = None) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        # The destination kind pydantic chose (its union tag) is not a key IT wrote: leave it out of the path.
        loc = tuple(str(p) for i, p in enumerate(err["loc"])
                    if not (i == 2 and err["loc"][0] == "destinations" and p in ("dicom", "dicomweb")))
        where = _where(loc, data or {}) or "(top level)"
        msg = "unknown key" + did_you_mean(Config, err["loc"]) if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {where}: {msg}{_env_cause(loc, env_names)}")
    return "\n".join(lines)


def _where(loc: tuple[str, ...], data: dict[str, Any]) -> str:
    """A key's path as IT reads it: a destination by its name (``destinations[pacs].port``), not its index."""
    if len(loc) >= 2 and loc[0] == "destinations" and loc[1].isdigit():
        listed = data.get("destinations")
        entry = listed[int(loc[1])] if isinstance(listed, list) and int(loc[1]) < len(listed) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        head = f"destinations[{name if isinstance(name, str) and name else loc[1]}]"
        return ".".join((head, *loc[2:]))
    return ".".join(loc)


def _env_cause(loc: tuple[str, ...], env_names: dict[tuple[str, ...], str]) -> str:
    """The environment variable that set the key in error or a section above it; else those that set keys below
    it (an unknown section LUNGNODE_DICMO__PORT, a TLS section that LUNGNODE_DICOM__TLS__ENABLED made invalid)."""
    var = next((env_names[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in env_names), None)
    if var is not None:
        return f" (set by environment variable {var})"
    below = sorted(name for path, name in env_names.items() if loc and path[:len(loc)] == loc)
    if below:
        return f" (from environment variable{'s' if len(below) > 1 else ''} {', '.join(below)})"
    return ""


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Build the effective configuration; raise ConfigError naming every bad key."""
    data: dict[str, Any] = {}
    source = "embedded defaults"
    if path is not None:
        source = str(path)
        data = read_yaml_mapping(path, ConfigError, "config file")
    env, env_names = _env_overrides(dict(os.environ if environ is None else environ))
    if env:
        data = _merge(data, env)
        source += " + environment"
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source, env_names, data)) from exc
