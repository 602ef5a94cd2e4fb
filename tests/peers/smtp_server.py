#!/usr/bin/env python3
"""A scriptable SMTP server on loopback for mailroom's integration tests, demo and chaos runs.

One asyncio process: an aiosmtpd SMTP server (plain, STARTTLS or implicit TLS; AUTH PLAIN,
LOGIN and XOAUTH2) that stores every accepted message on disk, and a small JSON control API
over plain HTTP that lets a test script replies, drops, outages and latency.

Run it with the virtual environment that hack/pyenv.sh prepares. See README.md beside this
file for the command line and the control API.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import base64
import binascii
import email.parser
import email.policy
import hmac
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, TLSSetupException

LOG = logging.getLogger("smtp-peer")

# Exchange Online's audience in the global service (--xoauth2-audience names a national
# cloud's: https://outlook.office365.us, https://outlook-dod.office365.us, https://partner.outlook.cn)
# and the permission SMTP client submission with an app-only token needs. The permission may be
# consented in Entra (the token's roles) or assigned in Exchange through RBAC for Applications
# (then absent from the token; Message Center MC1158911), so the emulator decides it, per mailbox:
# https://learn.microsoft.com/en-us/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth
# https://learn.microsoft.com/en-us/exchange/permissions-exo/application-rbac
DEFAULT_OUTLOOK_AUDIENCE = "https://outlook.office365.com"
SEND_AS_APP_PERMISSION = "SMTP.SendAsApp"

REPLY_NEED_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"
REPLY_NEED_AUTH = "530 5.7.57 Client not authenticated to send mail"
# Exchange Online's answer when a mailbox has more SMTP AUTH sessions than it allows (three):
# https://learn.microsoft.com/exchange/troubleshoot/send-emails/smtp-submission-improvements
REPLY_TOO_MANY_SESSIONS = "432 4.3.2 Concurrent connections limit exceeded"
REPLY_AUTH_OK = "235 2.7.0 Authentication successful"
REPLY_BAD_CREDENTIALS = "535 5.7.8 Authentication credentials invalid"
# What Exchange Online answers to any XOAUTH2 failure.
REPLY_XOAUTH2_FAILED = "535 5.7.3 Authentication unsuccessful"
REPLY_AUTH_TEMPFAIL = "454 4.7.0 Temporary authentication failure"
REPLY_SERVICE_DOWN = "421 4.3.2 Service not available"

# A scripted reply: one line, a 2xx, 4xx or 5xx code, optional text.
REPLY_RE = re.compile(r"^[245][0-9][0-9](?: [^\r\n]*)?$")
MAX_CONTROL_BODY = 1 << 20


class ConfigError(Exception):
    """A command-line combination that cannot work."""


class BadRequest(Exception):
    """A control API request that is malformed; answered with 400."""


# ---------------------------------------------------------------------------------------------
# Small helpers


PRIVATE_NETWORKS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]


def parse_loopback(value: str, allow_private: bool = False) -> tuple[str, int]:
    """Parses HOST:PORT and insists on a loopback host, so the peer never listens elsewhere; with
    allow_private, also a private (RFC 1918) IPv4 address, such as the one a local cluster's Pods
    reach the host on."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as err:
        raise ConfigError(f"not an IP address: {host!r}") from err
    private = addr.version == 4 and any(addr in n for n in PRIVATE_NETWORKS)
    if not addr.is_loopback and not (allow_private and private):
        raise ConfigError(f"refusing to listen on non-loopback address {host}")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"port out of range: {port}")
    return str(addr), port


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Writes through a temporary file and a rename, so readers never see a partial file.

    No fsync: the files must outlive this server (a test kills it and reads them), not the
    machine. An fsync per file ran inside the event loop, twice per message, and held every open
    session's reply for the disk.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def reply_code(line: str | bytes) -> str | None:
    """The three-digit code of an SMTP reply line, if it has one."""
    text = line.decode("ascii", "replace") if isinstance(line, bytes) else line
    code = text[:3]
    return code if len(code) == 3 and code.isdigit() else None


def validate_reply(value: Any, what: str) -> str:
    if not isinstance(value, str) or not REPLY_RE.match(value):
        raise BadRequest(f"{what}: expected one SMTP reply line like '451 4.3.0 Try again', got {value!r}")
    return value


def message_id_of(raw: bytes) -> str | None:
    """The Message-ID header of a message, read from its header block only."""
    try:
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    except Exception:  # a malformed message is still stored; it just has no Message-ID
        return None
    value = headers.get("Message-ID")
    return str(value).strip() if value is not None else None


def generate_self_signed(directory: Path, ca_path: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """Creates a CA and a server certificate for 127.0.0.1, ::1, localhost and `host`.

    The CA goes to `ca_path` so clients can trust it; the server's chain and key go to
    `directory`. ECDSA P-256 keeps generation instant; the extensions are the ones strict
    verifiers (webpki, OpenSSL's X509_STRICT) insist on.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(timezone.utc)
    not_before = now - timedelta(minutes=5)
    not_after = now + timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailroom tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, "mailroom test SMTP CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
                + ([x509.IPAddress(ipaddress.ip_address(host))] if host not in ("127.0.0.1", "::1") else [])
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    pem = serialization.Encoding.PEM
    write_atomic(
        key_path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600
    )
    write_atomic(cert_path, cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    write_atomic(ca_path, ca_cert.public_bytes(pem))
    return cert_path, key_path


def parse_xoauth2(initial: bytes) -> tuple[str, str] | None:
    """Splits a decoded XOAUTH2 initial response into (user, bearer token)."""
    try:
        text = initial.decode("utf-8")
    except UnicodeDecodeError:
        return None
    user = token = None
    for part in text.split("\x01"):
        if part.startswith("user="):
            user = part[len("user=") :]
        elif part.startswith("auth="):
            scheme, _, value = part[len("auth=") :].partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
    if not user or not token:
        return None
    return user, token


def refusal(answer: Any, now: float, audience: str) -> str | None:
    """Why an introspection answer does not let the token submit mail, or None if it does.

    The answer must be active, for Exchange Online's audience in this cloud, unexpired, and
    authorized for SMTP.SendAsApp on the XOAUTH2 user's mailbox. The words never include the
    token.
    """
    if not isinstance(answer, dict) or answer.get("active") is not True:
        return "token not active"
    aud = answer.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if not any(isinstance(a, str) and a.rstrip("/") == audience for a in audiences):
        return f"audience {aud!r} is not {audience}"
    exp = answer.get("exp")
    if isinstance(exp, (int, float)) and not isinstance(exp, bool) and exp <= now:
        return "token expired"
    if answer.get("authorized") is not True:
        return f"no {SEND_AS_APP_PERMISSION} for this mailbox (neither a token role nor an Exchange role assignment)"
    return None


# ---------------------------------------------------------------------------------------------
# State


@dataclass
class Config:
    smtp_host: str
    smtp_port: int
    control_host: str
    control_port: int
    state_dir: Path
    hostname: str
    tls_cert: Path | None
    tls_key: Path | None
    self_signed: bool
    implicit_tls: bool
    require_starttls: bool
    auth_user: str | None
    auth_pass: str | None
    xoauth2_introspect: str | None
    xoauth2_ca: Path | None
    xoauth2_audience: str
    require_auth: bool
    max_message_size: int
    max_sessions_per_login: int = 0


@dataclass
class Script:
    """What tests asked the server to do; cleared by POST /reset."""

    rcpt: dict[str, str] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    mail: list[str] = field(default_factory=list)
    drop_in_data: int = 0
    # Each transaction is dropped with this probability, drawn from a seeded RNG for replays.
    drop_in_data_rate: float = 0.0
    drop_in_data_seed: int | None = None
    rng: random.Random = field(default_factory=random.Random)
    latency_ms: float = 0.0
    down: Any = False  # False, True (not listening) or "421"

    def to_json(self) -> dict[str, Any]:
        return {
            "rcpt": dict(self.rcpt),
            "data": list(self.data),
            "mail": list(self.mail),
            "drop_in_data": self.drop_in_data,
            "drop_in_data_rate": self.drop_in_data_rate,
            "drop_in_data_seed": self.drop_in_data_seed,
            "latency_ms": self.latency_ms,
            "down": self.down,
        }

    def should_drop(self) -> bool:
        """Whether this DATA is cut: the counted drops first, then a draw at the rate."""
        if self.drop_in_data > 0:
            self.drop_in_data -= 1
            return True
        return self.drop_in_data_rate > 0 and self.rng.random() < self.drop_in_data_rate


@dataclass
class Stats:
    connections: int = 0
    accepted: int = 0
    dropped: int = 0
    refused_connections: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    auth_succeeded: int = 0
    auth_failed: int = 0
    quits: int = 0
    over_session_limit: int = 0

    def to_json(self, down: Any, open_sessions: int) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "open": open_sessions,
            "quits": self.quits,
            "over_session_limit": self.over_session_limit,
            "accepted": self.accepted,
            "dropped": self.dropped,
            "refused_connections": self.refused_connections,
            "rejected": dict(sorted(self.rejected.items())),
            "rejected_total": sum(self.rejected.values()),
            "auth": {"succeeded": self.auth_succeeded, "failed": self.auth_failed},
            "down": down,
        }


class Peer:
    """The process: configuration, scripts, stats, stored messages and both listeners."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.script = Script()
        self.stats = Stats()
        self.messages_dir = cfg.state_dir / "messages"
        self.messages_dir.mkdir(parents=True, exist_ok=True)
        self.next_id = 1 + max((int(p.stem) for p in self.messages_dir.glob("*.json") if p.stem.isdigit()), default=0)
        self.handler = Handler(self)
        self.tls_context: ssl.SSLContext | None = None
        self.xoauth2_context: ssl.SSLContext | None = None
        self.smtp_server: asyncio.base_events.Server | None = None
        self.control_server: asyncio.base_events.Server | None = None
        self.connections: set[PeerSMTP] = set()
        self.stopping = asyncio.Event()

    # -- TLS --------------------------------------------------------------------------------------

    def setup_tls(self) -> None:
        cfg = self.cfg
        cert, key = cfg.tls_cert, cfg.tls_key
        if cfg.self_signed:
            cert, key = generate_self_signed(cfg.state_dir / "tls", cfg.state_dir / "ca.pem", cfg.smtp_host)
            LOG.info("generated a CA and a server certificate; clients trust %s", cfg.state_dir / "ca.pem")
        if cert is not None and key is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(cert), str(key))
            self.tls_context = ctx
        if cfg.xoauth2_introspect:
            ctx = ssl.create_default_context(cafile=str(cfg.xoauth2_ca) if cfg.xoauth2_ca else None)
            self.xoauth2_context = ctx

    # -- SMTP listener ------------------------------------------------------------------------------

    def make_protocol(self) -> PeerSMTP:
        cfg = self.cfg
        excluded = []
        if not cfg.auth_user:
            excluded += ["PLAIN", "LOGIN"]
        if not cfg.xoauth2_introspect:
            excluded.append("XOAUTH2")
        return PeerSMTP(
            self,
            self.handler,
            hostname=cfg.hostname,
            ident="ESMTP mailroom test SMTP peer",
            data_size_limit=cfg.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            # Implicit TLS happens below SMTP, so aiosmtpd must not offer STARTTLS then.
            tls_context=None if cfg.implicit_tls else self.tls_context,
            # TLS and AUTH requirements are enforced by PeerSMTP, so that they also hold for
            # implicit TLS and answer with the codes Exchange Online uses.
            require_starttls=False,
            auth_require_tls=False,
            auth_required=False,
            auth_exclude_mechanism=excluded,
            authenticator=self.authenticate_password,
            loop=asyncio.get_running_loop(),
        )

    async def start_smtp(self) -> None:
        loop = asyncio.get_running_loop()
        ssl_ctx = self.tls_context if self.cfg.implicit_tls else None
        self.smtp_server = await loop.create_server(
            self.make_protocol,
            host=self.cfg.smtp_host,
            port=self.cfg.smtp_port,
            ssl=ssl_ctx,
            reuse_address=True,
        )
        # Port 0 means "pick one"; keep the chosen port so going down and up keeps it.
        self.cfg.smtp_port = self.smtp_server.sockets[0].getsockname()[1]

    def stop_smtp_listening(self) -> None:
        # Closing the server stops accepting; established sessions continue.
        if self.smtp_server is not None:
            self.smtp_server.close()
            self.smtp_server = None

    def end_sessions(self) -> None:
        # A server that goes down, or into maintenance, takes its sessions with it: a client
        # that kept one open finds it closed at its next command.
        for session in list(self.connections):
            if session.transport is not None:
                session.transport.abort()

    async def set_down(self, down: Any) -> None:
        if down in (True, "421"):
            self.end_sessions()
        if down is True and self.smtp_server is not None:
            self.stop_smtp_listening()
            LOG.info("SMTP port %d is down: not listening", self.cfg.smtp_port)
        elif down is not True and self.smtp_server is None:
            await self.start_smtp()
            LOG.info("SMTP port %d is listening again", self.cfg.smtp_port)
        if down == "421":
            LOG.info("SMTP port %d answers new connections with 421", self.cfg.smtp_port)
        self.script.down = down

    # -- AUTH -------------------------------------------------------------------------------------

    def authenticate_password(self, server, session, envelope, mechanism: str, auth_data: Any) -> AuthResult:
        """aiosmtpd authenticator for PLAIN and LOGIN: a constant-time check of the one account."""
        cfg = self.cfg
        ok = (
            isinstance(auth_data, LoginPassword)
            and cfg.auth_user is not None
            and cfg.auth_pass is not None
            and hmac.compare_digest(auth_data.login, cfg.auth_user.encode())
            and hmac.compare_digest(auth_data.password, cfg.auth_pass.encode())
        )
        user = auth_data.login.decode("utf-8", "replace") if isinstance(auth_data, LoginPassword) else "?"
        if ok:
            self.stats.auth_succeeded += 1
            session.peer_auth = {"user": user, "mechanism": mechanism}
            LOG.info("AUTH %s succeeded for %s", mechanism, user)
            return AuthResult(success=True, handled=False, message=REPLY_AUTH_OK)
        self.stats.auth_failed += 1
        LOG.info("AUTH %s failed for %s", mechanism, user)
        return AuthResult(success=False, handled=False, message=REPLY_BAD_CREDENTIALS)

    async def introspect(self, token: str, mailbox: str) -> Any:
        """Asks the identity emulator about a token and whether it may send as `mailbox`; the
        token goes nowhere else."""
        url = self.cfg.xoauth2_introspect
        assert url is not None
        body = json.dumps({"token": token, "mailbox": mailbox, "permission": SEND_AS_APP_PERMISSION}).encode()

        def call() -> Any:
            request = urllib.request.Request(
                url,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10, context=self.xoauth2_context) as response:
                return json.loads(response.read())

        return await asyncio.to_thread(call)

    # -- storage ----------------------------------------------------------------------------------

    def store(self, server: PeerSMTP, session, envelope) -> dict[str, Any]:
        n = self.next_id
        self.next_id += 1
        queue_id = secrets.token_hex(5).upper()
        raw: bytes = envelope.original_content or b""
        eml = self.messages_dir / f"{n}.eml"
        write_atomic(eml, raw)
        auth = getattr(session, "peer_auth", None) or {}
        ssl_object = server.ssl_object()
        record = {
            "id": n,
            "queue_id": queue_id,
            "mail_from": envelope.mail_from,
            "mail_options": list(envelope.mail_options),
            "rcpt_tos": list(envelope.rcpt_tos),
            "auth_user": auth.get("user"),
            "auth_mechanism": auth.get("mechanism"),
            "auth_client_id": auth.get("client_id"),
            "tls": ssl_object is not None,
            "tls_version": ssl_object.version() if ssl_object is not None else None,
            "message_id": message_id_of(raw),
            "size": len(raw),
            "received_at": now_rfc3339(),
            "helo": session.host_name,
            "eml": str(eml.resolve()),
        }
        write_json_atomic(self.messages_dir / f"{n}.json", record)
        return record

    def list_messages(self) -> list[dict[str, Any]]:
        records = []
        for path in sorted(
            (p for p in self.messages_dir.glob("*.json") if p.stem.isdigit()), key=lambda p: int(p.stem)
        ):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # removed by a concurrent reset
        return records

    def clear_messages(self) -> None:
        for path in self.messages_dir.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
        self.next_id = 1

    # -- control API ------------------------------------------------------------------------------

    async def start_control(self) -> None:
        self.control_server = await asyncio.start_server(
            self.serve_control, host=self.cfg.control_host, port=self.cfg.control_port, reuse_address=True
        )
        self.cfg.control_port = self.control_server.sockets[0].getsockname()[1]

    async def serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                method, path, body = await asyncio.wait_for(read_http_request(reader), timeout=30)
                status, payload = await self.route(method, path, body)
            except BadRequest as err:
                status, payload = 400, {"error": str(err)}
            except asyncio.TimeoutError:
                return
            if isinstance(payload, bytes):
                content, ctype = payload, "message/rfc822"
            else:
                content, ctype = (json.dumps(payload, indent=2) + "\n").encode(), "application/json"
            reason = {
                200: "OK",
                400: "Bad Request",
                404: "Not Found",
                405: "Method Not Allowed",
                500: "Internal Server Error",
            }
            head = (
                f"HTTP/1.1 {status} {reason.get(status, 'Status')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(content)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + content)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        routes = {
            ("GET", "/health"): lambda: self.ok({"ok": True}),
            ("GET", "/messages"): lambda: self.ok(self.list_messages()),
            ("GET", "/stats"): lambda: self.ok(self.stats.to_json(self.script.down, len(self.connections))),
            ("GET", "/script"): lambda: self.ok(self.script.to_json()),
            ("POST", "/reset"): self.reset,
            ("POST", "/script"): lambda: self.apply_script(decode_json_body(body)),
        }
        handler = routes.get((method, path))
        if handler is not None:
            result = handler()
            return await result if asyncio.iscoroutine(result) else result
        m = re.fullmatch(r"/messages/([0-9]+)(/raw)?", path)
        if m and method == "GET":
            n = int(m.group(1))
            if m.group(2):
                eml = self.messages_dir / f"{n}.eml"
                return (200, eml.read_bytes()) if eml.is_file() else (404, {"error": "no such message"})
            record = self.messages_dir / f"{n}.json"
            return (200, json.loads(record.read_text())) if record.is_file() else (404, {"error": "no such message"})
        if any(p == path for (_, p) in routes) or m:
            return 405, {"error": f"{method} not allowed on {path}"}
        return 404, {"error": f"no route {path}"}

    @staticmethod
    def ok(payload: Any) -> tuple[int, Any]:
        return 200, payload

    async def reset(self) -> tuple[int, Any]:
        self.clear_messages()
        await self.set_down(False)
        self.script = Script()
        self.stats = Stats()
        LOG.info("reset: messages, scripts and stats cleared")
        return 200, {"ok": True}

    async def apply_script(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object")
        known = {"rcpt", "data", "mail", "drop_in_data", "drop_in_data_rate", "drop_in_data_seed", "latency_ms", "down"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise BadRequest(f"unknown keys {unknown}; known: {sorted(known)}")
        # Validate everything first so a bad request changes nothing.
        rcpt = body.get("rcpt")
        if rcpt is not None:
            if not isinstance(rcpt, dict):
                raise BadRequest("rcpt: expected an object of address -> reply")
            for address, reply in rcpt.items():
                if reply is not None:
                    validate_reply(reply, f"rcpt[{address}]")
        queues = {}
        for key in ("data", "mail"):
            if key in body:
                value = body[key]
                if not isinstance(value, list):
                    raise BadRequest(f"{key}: expected a list of replies")
                queues[key] = [validate_reply(v, f"{key}[{i}]") for i, v in enumerate(value)]
        drop = body.get("drop_in_data")
        if drop is not None and (not isinstance(drop, int) or isinstance(drop, bool) or drop < 0):
            raise BadRequest("drop_in_data: expected a non-negative integer")
        rate = body.get("drop_in_data_rate")
        if rate is not None and (not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate <= 1):
            raise BadRequest("drop_in_data_rate: expected a number between 0 and 1")
        seed = body.get("drop_in_data_seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise BadRequest("drop_in_data_seed: expected an integer")
        latency = body.get("latency_ms")
        if latency is not None and (
            not isinstance(latency, (int, float)) or isinstance(latency, bool) or not 0 <= latency <= 600_000
        ):
            raise BadRequest("latency_ms: expected a number of milliseconds between 0 and 600000")
        down = body.get("down")
        if "down" in body and down not in (True, False, "421", "refuse"):
            raise BadRequest('down: expected true, false, "refuse" or "421"')

        if rcpt is not None:
            for address, reply in rcpt.items():
                if reply is None:
                    self.script.rcpt.pop(address.lower(), None)
                else:
                    self.script.rcpt[address.lower()] = reply
        if "data" in queues:
            self.script.data = queues["data"]
        if "mail" in queues:
            self.script.mail = queues["mail"]
        if drop is not None:
            self.script.drop_in_data = drop
        if rate is not None:
            self.script.drop_in_data_rate = float(rate)
        if "drop_in_data_seed" in body:
            # A new seed (or null: a random one) restarts the sequence of draws.
            self.script.drop_in_data_seed = seed
            self.script.rng = random.Random(seed)
        if latency is not None:
            self.script.latency_ms = float(latency)
        if "down" in body:
            try:
                await self.set_down(True if down == "refuse" else down)
            except OSError as err:
                return 500, {"error": f"could not listen on port {self.cfg.smtp_port} again: {err}"}
        LOG.info("script updated: %s", ", ".join(sorted(body)) or "nothing")
        return 200, self.script.to_json()

    # -- lifecycle --------------------------------------------------------------------------------

    def write_ready(self) -> None:
        ready = {
            "smtp_port": self.cfg.smtp_port,
            "control_port": self.cfg.control_port,
            "pid": os.getpid(),
            "tls": "implicit" if self.cfg.implicit_tls else ("starttls" if self.tls_context else "none"),
        }
        if self.cfg.self_signed:
            ready["ca"] = str((self.cfg.state_dir / "ca.pem").resolve())
        write_json_atomic(self.cfg.state_dir / "ready.json", ready)

    async def run(self) -> None:
        (self.cfg.state_dir / "ready.json").unlink(missing_ok=True)
        self.setup_tls()
        await self.start_smtp()
        await self.start_control()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.write_ready()
        LOG.info(
            "listening: smtp %s:%d (%s), control http://%s:%d",
            self.cfg.smtp_host,
            self.cfg.smtp_port,
            "implicit TLS" if self.cfg.implicit_tls else ("STARTTLS" if self.tls_context else "plain"),
            self.cfg.control_host,
            self.cfg.control_port,
        )
        await self.stopping.wait()
        LOG.info("stopping")
        self.stop_smtp_listening()
        if self.control_server is not None:
            self.control_server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        (self.cfg.state_dir / "ready.json").unlink(missing_ok=True)
        await asyncio.sleep(0.05)  # let connection_lost callbacks run before the loop closes


async def read_http_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    request_line = (await reader.readline()).decode("latin-1").strip()
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise BadRequest(f"malformed request line {request_line!r}")
    method, path, _ = parts
    length = 0
    while True:
        line = (await reader.readline()).decode("latin-1")
        if line in ("\r\n", "\n", ""):
            break
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            if not value.strip().isdigit():
                raise BadRequest("bad Content-Length")
            length = int(value.strip())
        elif name.strip().lower() == "transfer-encoding":
            raise BadRequest("chunked bodies are not supported; send Content-Length")
    if length > MAX_CONTROL_BODY:
        raise BadRequest("body too large")
    body = await reader.readexactly(length) if length else b""
    return method.upper(), path, body


def decode_json_body(body: bytes) -> Any:
    try:
        return json.loads(body or b"{}")
    except ValueError as err:
        raise BadRequest(f"body is not JSON: {err}") from err


# ---------------------------------------------------------------------------------------------
# SMTP protocol and handler


class PeerSMTP(SMTP):
    """aiosmtpd's SMTP with the peer's gates: outages, TLS and AUTH requirements, drops, stats."""

    # The AUTH LOGIN prompts Exchange Online sends.
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    # Exchange Online takes long command lines: an XOAUTH2 initial response carries a whole JWT,
    # well over aiosmtpd's default of 512 bytes.
    LONG_COMMAND_LIMIT = 16384
    # The stream reader's limit is taken from this at construction; DATA lines keep RFC 5321's
    # 1,000 below.
    line_length_limit = LONG_COMMAND_LIMIT

    def __init__(self, peer: Peer, *args: Any, **kwargs: Any):
        self.peer = peer
        super().__init__(*args, **kwargs)
        self.line_length_limit = 1001
        self.command_size_limit = self.LONG_COMMAND_LIMIT
        self.command_size_limits = collections.defaultdict(lambda: self.LONG_COMMAND_LIMIT)

    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session of this connection (implicit or after STARTTLS), if any."""
        transport = self.transport
        return transport.get_extra_info("ssl_object") if transport is not None else None

    def tls_ok(self) -> bool:
        return not self.peer.cfg.require_starttls or self.ssl_object() is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer.connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.peer.connections.discard(self)
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        code = reply_code(status)
        if code is not None and code[0] in "45":
            rejected = self.peer.stats.rejected
            rejected[code] = rejected.get(code, 0) + 1
        await super().push(status)

    async def _handle_client(self) -> None:
        if self.peer.script.down == "421":
            self.peer.stats.refused_connections += 1
            LOG.info("connection from %s refused with 421 (down)", self.session.peer)
            await self.push(REPLY_SERVICE_DOWN)
            self.transport.close()
            return
        self.peer.stats.connections += 1
        LOG.info("connection from %s", self.session.peer)
        await super()._handle_client()

    async def smtp_QUIT(self, arg: str) -> None:
        self.peer.stats.quits += 1
        await super().smtp_QUIT(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.tls_ok():
            await self.push(REPLY_NEED_STARTTLS)
            return
        await super().smtp_AUTH(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.session.host_name and not self.tls_ok():
            await self.push(REPLY_NEED_STARTTLS)
            return
        if self.session.host_name and self.peer.cfg.require_auth and not self.session.authenticated:
            await self.push(REPLY_NEED_AUTH)
            return
        if self.session.host_name and self.over_session_limit():
            self.peer.stats.over_session_limit += 1
            await self.push(REPLY_TOO_MANY_SESSIONS)
            return
        await super().smtp_MAIL(arg)

    def login(self) -> str | None:
        auth = getattr(self.session, "peer_auth", None) or {}
        user = auth.get("user")
        return user.lower() if isinstance(user, str) else None

    def over_session_limit(self) -> bool:
        """Whether more open sessions than --max-sessions-per-login are logged in as this one's
        user (idle ones count: Exchange Online does not say that they do not)."""
        limit, user = self.peer.cfg.max_sessions_per_login, self.login()
        if not limit or user is None:
            return False
        return sum(1 for c in self.peer.connections if c.login() == user) > limit

    async def smtp_RCPT(self, arg: str | None) -> None:
        if self.session.host_name and not self.tls_ok():
            await self.push(REPLY_NEED_STARTTLS)
            return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if self.session.host_name and not self.tls_ok():
            await self.push(REPLY_NEED_STARTTLS)
            return
        script = self.peer.script
        if self.session.host_name and self.envelope.rcpt_tos and not arg and script.should_drop():
            self.peer.stats.dropped += 1
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            # Take the first line of the message, then cut the connection without a reply:
            # the client cannot tell whether the message was accepted.
            try:
                await asyncio.wait_for(self._reader.readuntil(b"\r\n"), timeout=10)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            LOG.info("dropping the connection from %s in the middle of DATA (scripted)", self.session.peer)
            if self.transport is not None:
                self.transport.abort()
            # Ends this session's command loop the way aiosmtpd ends it on a lost connection.
            raise asyncio.CancelledError()
        await super().smtp_DATA(arg)


class Handler:
    """aiosmtpd hooks: EHLO advertisement, scripted replies, XOAUTH2 and storage."""

    def __init__(self, peer: Peer):
        self.peer = peer

    async def handle_exception(self, error: Exception) -> str:
        # A failed TLS handshake is a client's business (an untrusted CA, say): one line, and
        # aiosmtpd closes the connection. Anything else is a bug here and keeps its traceback.
        if isinstance(error, TLSSetupException):
            LOG.info("TLS handshake failed: %s", error.__cause__ or error)
            return "454 4.7.0 TLS not available due to temporary reason"
        LOG.exception("SMTP session error")
        return f"451 4.3.0 Internal error: {type(error).__name__}"

    async def handle_EHLO(self, server: PeerSMTP, session, envelope, hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        kept = []
        for line in responses:
            text = line[4:]
            if text.startswith("AUTH"):
                # Only advertise mechanisms that are configured and usable on this connection.
                if len(text.split()) < 2 or not server.tls_ok():
                    continue
            kept.append(text)
        return [f"250-{t}" for t in kept[:-1]] + [f"250 {kept[-1]}"]

    async def handle_MAIL(self, server: PeerSMTP, session, envelope, address: str, mail_options: list[str]) -> str:
        script = self.peer.script
        reply = script.mail.pop(0) if script.mail else None
        if reply is not None and not reply.startswith("2"):
            LOG.info("MAIL FROM:<%s> answered with scripted %s", address, reply[:3])
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return reply or "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: PeerSMTP, session, envelope, address: str, rcpt_options: list[str]) -> str:
        rules = self.peer.script.rcpt
        lowered = address.lower()
        domain = "@" + lowered.rpartition("@")[2]
        reply = rules.get(lowered) or rules.get(domain)
        if reply is not None and not reply.startswith("2"):
            LOG.info("RCPT TO:<%s> answered with scripted %s", address, reply[:3])
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return reply or "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: PeerSMTP, session, envelope) -> str:
        script = self.peer.script
        if script.latency_ms > 0:
            await asyncio.sleep(script.latency_ms / 1000)
        reply = script.data.pop(0) if script.data else None
        if reply is not None and not reply.startswith("2"):
            LOG.info("DATA from <%s> answered with scripted %s", envelope.mail_from, reply[:3])
            return reply
        record = self.peer.store(server, session, envelope)
        self.peer.stats.accepted += 1
        LOG.info(
            "accepted message %d (%s) from <%s> to %d recipient(s), %d bytes",
            record["id"],
            record["queue_id"],
            envelope.mail_from,
            len(envelope.rcpt_tos),
            record["size"],
        )
        return reply or f"250 2.0.0 OK {record['queue_id']} queued"

    async def auth_XOAUTH2(self, server: PeerSMTP, args: list[str]) -> AuthResult:
        """SASL XOAUTH2 (the initial response or one continuation), checked by introspection."""
        peer = self.peer
        if len(args) == 1:
            blob = await server.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)  # already answered
        else:
            try:
                blob = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parsed = parse_xoauth2(blob)
        if parsed is None:
            peer.stats.auth_failed += 1
            LOG.info("AUTH XOAUTH2 failed: malformed initial response")
            return AuthResult(success=False, handled=False, message=REPLY_XOAUTH2_FAILED)
        user, token = parsed
        try:
            answer = await peer.introspect(token, user)
        except (OSError, ValueError, urllib.error.URLError) as err:
            peer.stats.auth_failed += 1
            # The error text comes from the transport, never from the token.
            LOG.warning("AUTH XOAUTH2 for %s: introspection unavailable: %s", user, type(err).__name__)
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_TEMPFAIL)
        reason = refusal(answer, time.time(), peer.cfg.xoauth2_audience)
        if reason is not None:
            peer.stats.auth_failed += 1
            LOG.info("AUTH XOAUTH2 failed for %s: %s", user, reason)
            return AuthResult(success=False, handled=False, message=REPLY_XOAUTH2_FAILED)
        peer.stats.auth_succeeded += 1
        client_id = answer.get("clientId") if isinstance(answer, dict) else None
        server.session.peer_auth = {"user": user, "mechanism": "XOAUTH2", "client_id": client_id}
        LOG.info("AUTH XOAUTH2 succeeded for %s (client %s)", user, client_id)
        return AuthResult(success=True, handled=False, message=REPLY_AUTH_OK)


# ---------------------------------------------------------------------------------------------
# Command line


def build_config(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description="Scriptable SMTP server on loopback for mailroom's tests.")
    parser.add_argument("--listen", default="127.0.0.1:0", help="SMTP address, loopback only (port 0: pick one)")
    parser.add_argument(
        "--allow-private",
        action="store_true",
        help="allow a private (RFC 1918) IPv4 address for --listen (the control API stays on loopback)",
    )
    parser.add_argument("--control-listen", default="127.0.0.1:0", help="control API address, loopback only")
    parser.add_argument("--state-dir", required=True, type=Path, help="where ready.json, ca.pem and messages/ go")
    parser.add_argument("--hostname", default="localhost", help="name in the greeting and EHLO reply")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain: enables STARTTLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    parser.add_argument(
        "--self-signed", action="store_true", help="generate a CA and server certificate; CA in DIR/ca.pem"
    )
    parser.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte instead of STARTTLS")
    parser.add_argument("--require-starttls", action="store_true", help="refuse AUTH, MAIL, RCPT and DATA before TLS")
    parser.add_argument("--auth-user", help="enables AUTH PLAIN and LOGIN for this user")
    parser.add_argument("--auth-pass", help="password for --auth-user (or env SMTP_PEER_AUTH_PASS)")
    parser.add_argument("--xoauth2-introspect", help="token introspection URL: enables AUTH XOAUTH2")
    parser.add_argument("--xoauth2-ca", type=Path, help="PEM CA bundle to trust for --xoauth2-introspect")
    parser.add_argument(
        "--xoauth2-audience",
        metavar="URL",
        help=f"Exchange Online audience XOAUTH2 tokens must carry (default {DEFAULT_OUTLOOK_AUDIENCE}; "
        "a national cloud's otherwise)",
    )
    parser.add_argument("--require-auth", action="store_true", help="refuse MAIL without AUTH")
    parser.add_argument("--max-message-size", type=int, default=35 * 1024 * 1024, help="SIZE limit in bytes")
    parser.add_argument(
        "--max-sessions-per-login",
        type=int,
        default=0,
        metavar="N",
        help="answer MAIL with 432 4.3.2 while more than N sessions are logged in as its user "
        "(Exchange Online allows 3 for SMTP AUTH); 0: no limit",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s smtp-peer %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # aiosmtpd's own log echoes protocol lines; keep it quiet so credentials never reach a log.
    logging.getLogger("mail.log").setLevel(logging.ERROR)

    smtp_host, smtp_port = parse_loopback(args.listen, args.allow_private)
    control_host, control_port = parse_loopback(args.control_listen)
    auth_pass = args.auth_pass if args.auth_pass is not None else os.environ.get("SMTP_PEER_AUTH_PASS")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.self_signed:
        raise ConfigError("--self-signed and --tls-cert exclude each other")
    has_tls = args.tls_cert is not None or args.self_signed
    if args.implicit_tls and not has_tls:
        raise ConfigError("--implicit-tls needs --tls-cert/--tls-key or --self-signed")
    if args.require_starttls and not has_tls:
        raise ConfigError("--require-starttls needs --tls-cert/--tls-key or --self-signed")
    if (args.auth_user is None) != (auth_pass is None):
        raise ConfigError("--auth-user and --auth-pass go together")
    if args.xoauth2_ca is not None and not args.xoauth2_introspect:
        raise ConfigError("--xoauth2-ca needs --xoauth2-introspect")
    if args.xoauth2_audience is not None and not args.xoauth2_introspect:
        raise ConfigError("--xoauth2-audience needs --xoauth2-introspect")
    audience = (args.xoauth2_audience or DEFAULT_OUTLOOK_AUDIENCE).rstrip("/")
    if not audience.startswith("https://") or len(audience) == len("https://"):
        raise ConfigError(f"--xoauth2-audience must be an https URL, not {args.xoauth2_audience!r}")
    if args.require_auth and args.auth_user is None and not args.xoauth2_introspect:
        raise ConfigError("--require-auth needs --auth-user or --xoauth2-introspect")
    if args.max_sessions_per_login < 0:
        raise ConfigError("--max-sessions-per-login must be 0 or more")
    for path in (args.tls_cert, args.tls_key, args.xoauth2_ca):
        if path is not None and not path.is_file():
            raise ConfigError(f"no such file: {path}")

    state_dir = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    return Config(
        smtp_host=smtp_host,
        smtp_port=smtp_port,
        control_host=control_host,
        control_port=control_port,
        state_dir=state_dir,
        hostname=args.hostname,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        self_signed=args.self_signed,
        implicit_tls=args.implicit_tls,
        require_starttls=args.require_starttls,
        auth_user=args.auth_user,
        auth_pass=auth_pass,
        xoauth2_introspect=args.xoauth2_introspect,
        xoauth2_ca=args.xoauth2_ca,
        xoauth2_audience=audience,
        require_auth=args.require_auth,
        max_message_size=args.max_message_size,
        max_sessions_per_login=args.max_sessions_per_login,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = build_config(argv)
    except ConfigError as err:
        print(f"smtp-peer: {err}", file=sys.stderr)
        return 2

    async def run() -> None:
        await Peer(cfg).run()

    try:
        asyncio.run(run())
    except OSError as err:
        print(f"smtp-peer: cannot start: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
