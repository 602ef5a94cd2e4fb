#!/usr/bin/env python3
"""Self-test of smtp_server.py: starts real server processes on loopback and talks SMTP to them.

Run with the virtual environment from hack/pyenv.sh:

    "$(hack/pyenv.sh)" tests/peers/selftest.py

Prints one line per check and a closing `N passed, M failed`; exits non-zero on any failure.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
SERVER = HERE / "smtp_server.py"
sys.dont_write_bytecode = True  # keep the source tree clean of __pycache__
sys.path.insert(0, str(HERE))

import smtp_server  # noqa: E402  (for its certificate generator, used by the fake introspection endpoint)

PASSWORD = "s3cret-Passw0rd-never-logged"
OUTLOOK = "https://outlook.office365.com"
OUTLOOK_US = "https://outlook.office365.us"


def message(subject: str, message_id: str) -> bytes:
    return (
        "From: Alerts <alerts@contoso.com>\r\n"
        "To: Ops <ops@contoso.com>\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Version 1.4.2 is live.\r\n"
        ".a line that starts with a dot\r\n"
    ).encode()


class Server:
    """One smtp_server.py process in its own state directory."""

    def __init__(self, name: str, root: Path, *args: str):
        self.name = name
        self.state = root / name
        self.log_path = root / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--state-dir", str(self.state), "--listen", "127.0.0.1:0", *args],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        ready = self.state / "ready.json"
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not write ready.json: {self.log_text()}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.smtp_port: int = info["smtp_port"]
        self.control_port: int = info["control_port"]
        assert info["pid"] == self.proc.pid, info

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def control(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.control_port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.control(method, path, body)
        assert status == 200, (method, path, status, payload)
        return payload

    def messages(self) -> list[dict[str, Any]]:
        return self.ok("GET", "/messages")

    def smtp(self, **kwargs: Any) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10, **kwargs)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def introspection_answer(entry: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """What the emulator answers for a token described by `entry`.

    `entry` is the answer itself plus, under "assigned", the mailboxes an Exchange RBAC for
    Applications assignment of SMTP.SendAsApp covers (absent from the token, as in Exchange).
    Asked about a mailbox and a permission, the answer adds "authorized": the permission in the
    token's roles, or the mailbox in the assignment's scope. "undecided" leaves it out, as an
    emulator without the question would.
    """
    answer = {k: v for k, v in entry.items() if k not in ("assigned", "undecided")}
    if "mailbox" in body and "permission" in body and not entry.get("undecided"):
        in_role = body["permission"] in (entry.get("roles") or [])
        in_scope = str(body["mailbox"]).lower() in [m.lower() for m in entry.get("assigned", [])]
        answer["authorized"] = entry.get("active") is True and (in_role or in_scope)
    return answer


class FakeIntrospection:
    """A tiny HTTPS stand-in for the Microsoft 365 emulator's POST /_emulator/introspect."""

    def __init__(self, root: Path, answers: dict[str, Any]):
        self.answers = answers
        self.requests: list[dict[str, Any]] = []
        tls_dir = root / "introspection"
        self.ca = tls_dir / "ca.pem"
        cert, key = smtp_server.generate_self_signed(tls_dir, self.ca)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                outer.requests.append({"path": self.path, "body": body, "type": self.headers.get("Content-Type")})
                entry = outer.answers.get(body.get("token"), {"active": False})
                if entry == "error":
                    self.send_response(500)
                    self.end_headers()
                    return
                payload = json.dumps(introspection_answer(entry, body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/_emulator/introspect"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Suite:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            self.failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        else:
            self.passed += 1
            print(f"ok   {name}", flush=True)


def expect(exc_type: type[BaseException], fn: Callable[[], Any]) -> BaseException:
    try:
        fn()
    except exc_type as err:
        return err
    raise AssertionError(f"expected {exc_type.__name__}")


def send(server: Server, subject: str, rcpts: list[str] | None = None, **login: Any) -> tuple[int, bytes]:
    """One transaction on a new connection; returns the DATA reply."""
    with server.smtp() as s:
        s.ehlo("client.test")
        if login:
            s.user, s.password = login["user"], login["password"]
            s.auth(login.get("mechanism", "PLAIN"), getattr(s, f"auth_{login.get('mechanism', 'PLAIN').lower()}"))
        code, reply = s.mail("alerts@contoso.com")
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, reply, "alerts@contoso.com")
        rcpts = rcpts or ["ops@contoso.com"]
        refused = {}
        for rcpt in rcpts:
            code, reply = s.rcpt(rcpt)
            if code not in (250, 251):
                refused[rcpt] = (code, reply)
        if len(refused) == len(rcpts):
            raise smtplib.SMTPRecipientsRefused(refused)
        code, reply = s.data(message(subject, f"<{subject.replace(' ', '-')}@mailroom.test>"))
        if code != 250:
            raise smtplib.SMTPDataError(code, reply)
        return code, reply


# ---------------------------------------------------------------------------------------------


def plain_checks(suite: Suite, root: Path) -> None:
    srv = Server("plain", root, "--auth-user", "alice", "--auth-pass", PASSWORD)
    try:

        def plain_send() -> None:
            with srv.smtp() as s:
                code, ehlo = s.ehlo("client.test")
                assert code == 250 and b"STARTTLS" not in ehlo and b"AUTH LOGIN PLAIN" in ehlo, ehlo
                s.mail("alerts@contoso.com")
                s.rcpt("ops@contoso.com")
                s.rcpt("audit@contoso.com")
                code, reply = s.data(message("plain send", "<plain-1@mailroom.test>"))
            assert code == 250, (code, reply)
            [record] = srv.messages()
            assert reply.decode() == f"2.0.0 OK {record['queue_id']} queued", reply
            assert record["mail_from"] == "alerts@contoso.com"
            assert record["rcpt_tos"] == ["ops@contoso.com", "audit@contoso.com"]
            assert record["tls"] is False and record["auth_user"] is None
            assert record["message_id"] == "<plain-1@mailroom.test>"
            raw = Path(record["eml"]).read_bytes()
            assert raw == message("plain send", "<plain-1@mailroom.test>"), raw
            assert (srv.state / "messages" / "1.json").is_file()
            assert srv.ok("GET", "/messages/1") == record
            assert srv.control("GET", "/messages/1/raw") == (200, raw)
            stats = srv.ok("GET", "/stats")
            assert stats["connections"] == 1 and stats["accepted"] == 1, stats

        def auth_plain_good() -> None:
            code, _ = send(srv, "auth plain", user="alice", password=PASSWORD, mechanism="PLAIN")
            assert code == 250
            record = srv.messages()[-1]
            assert record["auth_user"] == "alice" and record["auth_mechanism"] == "PLAIN", record

        def auth_login_good() -> None:
            code, _ = send(srv, "auth login", user="alice", password=PASSWORD, mechanism="LOGIN")
            assert code == 250
            assert srv.messages()[-1]["auth_mechanism"] == "LOGIN"

        def auth_plain_bad() -> None:
            err = expect(
                smtplib.SMTPAuthenticationError,
                lambda: send(srv, "auth bad", user="alice", password="wrong", mechanism="PLAIN"),
            )
            assert err.smtp_code == 535 and err.smtp_error.startswith(b"5.7.8"), err
            assert srv.ok("GET", "/stats")["auth"] == {"succeeded": 2, "failed": 1}

        def reset_clears() -> None:
            assert srv.ok("POST", "/reset") == {"ok": True}
            assert srv.messages() == []
            assert srv.ok("GET", "/stats")["connections"] == 0
            send(srv, "after reset")
            assert [m["id"] for m in srv.messages()] == [1]

        def scripted_data_451_then_250() -> None:
            srv.ok("POST", "/reset")
            script = srv.ok("POST", "/script", {"data": ["451 4.3.0 Try again later"]})
            assert script["data"] == ["451 4.3.0 Try again later"], script
            err = expect(smtplib.SMTPDataError, lambda: send(srv, "try 1"))
            assert err.smtp_code == 451 and err.smtp_error == b"4.3.0 Try again later", err
            assert srv.messages() == []
            code, _ = send(srv, "try 2")
            assert code == 250
            stats = srv.ok("GET", "/stats")
            assert stats["accepted"] == 1 and stats["rejected"] == {"451": 1}, stats

        def scripted_rcpt_550() -> None:
            srv.ok("POST", "/reset")
            srv.ok("POST", "/script", {"rcpt": {"Bad@Example.com": "550 5.1.1 User unknown"}})
            with srv.smtp() as s:
                refused = s.sendmail(
                    "alerts@contoso.com",
                    ["good@example.com", "bad@example.com"],
                    message("partial", "<partial@mailroom.test>"),
                )
            assert refused == {"bad@example.com": (550, b"5.1.1 User unknown")}, refused
            [record] = srv.messages()
            assert record["rcpt_tos"] == ["good@example.com"], record
            # Persistent until reset: a second transaction is refused the same way.
            err = expect(smtplib.SMTPRecipientsRefused, lambda: send(srv, "again", ["bad@example.com"]))
            assert err.recipients["bad@example.com"][0] == 550

        def scripted_mail() -> None:
            srv.ok("POST", "/reset")
            srv.ok("POST", "/script", {"mail": ["451 4.7.500 Server busy. Please try again later"]})
            err = expect(smtplib.SMTPSenderRefused, lambda: send(srv, "busy"))
            assert err.smtp_code == 451, err
            assert send(srv, "not busy")[0] == 250

        def drop_in_data() -> None:
            srv.ok("POST", "/reset")
            srv.ok("POST", "/script", {"drop_in_data": 1})
            expect((smtplib.SMTPServerDisconnected, ConnectionError), lambda: send(srv, "dropped"))  # type: ignore[arg-type]
            assert srv.messages() == []
            assert send(srv, "after drop")[0] == 250
            stats = srv.ok("GET", "/stats")
            assert stats["dropped"] == 1 and stats["accepted"] == 1, stats

        def drop_in_data_rate() -> None:
            def run() -> list[bool]:
                srv.ok("POST", "/reset")
                srv.ok("POST", "/script", {"drop_in_data_rate": 0.5, "drop_in_data_seed": 5})
                outcome = []
                for i in range(20):
                    try:
                        send(srv, f"maybe {i}")
                        outcome.append(True)
                    except (smtplib.SMTPServerDisconnected, ConnectionError):
                        outcome.append(False)
                return outcome

            first = run()
            dropped = first.count(False)
            assert 3 <= dropped <= 17, first
            stats = srv.ok("GET", "/stats")
            assert stats["dropped"] == dropped and stats["accepted"] == 20 - dropped, stats
            assert len(srv.messages()) == 20 - dropped
            # The same seed replays the same drops; a rate of 0 stops them.
            assert run() == first
            srv.ok("POST", "/script", {"drop_in_data_rate": 0})
            assert send(srv, "no more drops")[0] == 250
            status, body = srv.control("POST", "/script", {"drop_in_data_rate": 1.5})
            assert status == 400 and "drop_in_data_rate" in body["error"], body

        def down_then_up() -> None:
            srv.ok("POST", "/reset")
            srv.ok("POST", "/script", {"down": True})
            expect(ConnectionRefusedError, lambda: srv.smtp())
            srv.ok("POST", "/script", {"down": False})
            assert send(srv, "back up")[0] == 250

        def down_ends_open_sessions() -> None:
            srv.ok("POST", "/reset")
            kept = srv.smtp()
            kept.ehlo("selftest")
            assert srv.ok("GET", "/stats")["open"] == 1
            srv.ok("POST", "/script", {"down": True})
            expect(smtplib.SMTPServerDisconnected, lambda: kept.mail("alerts@contoso.com"))
            srv.ok("POST", "/script", {"down": False})
            polite = srv.smtp()
            polite.ehlo("selftest")
            polite.quit()
            stats = srv.ok("GET", "/stats")
            assert stats["quits"] == 1 and stats["connections"] == 2, stats

        def down_421_then_up() -> None:
            srv.ok("POST", "/reset")
            srv.ok("POST", "/script", {"down": "421"})
            err = expect(smtplib.SMTPConnectError, lambda: srv.smtp())
            assert err.smtp_code == 421 and err.smtp_error.startswith(b"4.3.2"), err
            srv.ok("POST", "/script", {"down": False})
            assert send(srv, "back up")[0] == 250
            assert srv.ok("GET", "/stats")["refused_connections"] == 1

        def latency() -> None:
            srv.ok("POST", "/reset")
            srv.ok("POST", "/script", {"latency_ms": 400})
            with srv.smtp() as s:
                s.ehlo("client.test")
                s.mail("alerts@contoso.com")
                s.rcpt("ops@contoso.com")
                start = time.monotonic()
                code, _ = s.data(message("slow", "<slow@mailroom.test>"))
                elapsed = time.monotonic() - start
            assert code == 250 and elapsed >= 0.4, elapsed

        def control_rejects_bad_input() -> None:
            status, body = srv.control("POST", "/script", {"data": ["hello"]})
            assert status == 400 and "data[0]" in body["error"], body
            status, body = srv.control("POST", "/script", {"dataa": []})
            assert status == 400, body
            status, _ = srv.control("GET", "/nope")
            assert status == 404

        def no_password_in_log() -> None:
            log = srv.log_text()
            assert PASSWORD not in log and base64.b64encode(PASSWORD.encode()).decode() not in log
            assert "AUTH PLAIN succeeded for alice" in log, log

        for name, fn in [
            ("plain send, stored .eml and envelope", plain_send),
            ("AUTH PLAIN good", auth_plain_good),
            ("AUTH LOGIN good", auth_login_good),
            ("AUTH PLAIN bad: 535 5.7.8", auth_plain_bad),
            ("reset clears messages and stats", reset_clears),
            ("scripted 451 then 250 for DATA", scripted_data_451_then_250),
            ("scripted 550 for one recipient, another accepted", scripted_rcpt_550),
            ("scripted 451 for MAIL FROM", scripted_mail),
            ("drop_in_data: connection cut, nothing stored", drop_in_data),
            ("drop_in_data_rate: a seeded share of transactions cut", drop_in_data_rate),
            ("down (not listening) then up", down_then_up),
            ("down with 421 4.3.2 then up", down_421_then_up),
            ("down ends the open sessions", down_ends_open_sessions),
            ("latency_ms delays the DATA reply", latency),
            ("control API rejects bad input", control_rejects_bad_input),
            ("password never logged", no_password_in_log),
        ]:
            suite.check(f"plain: {name}", fn)
    finally:
        code = srv.stop()
    suite.check("plain: SIGTERM exits 0 and removes ready.json", lambda: _stopped(srv, code))


def _stopped(srv: Server, code: int) -> None:
    assert code == 0, (code, srv.log_text())
    assert not (srv.state / "ready.json").exists()


def starttls_checks(suite: Suite, root: Path) -> None:
    srv = Server(
        "starttls",
        root,
        "--self-signed",
        "--require-starttls",
        "--require-auth",
        "--auth-user",
        "alice",
        "--auth-pass",
        PASSWORD,
    )
    trust = ssl.create_default_context(cafile=str(srv.state / "ca.pem"))
    try:

        def refused_before_tls() -> None:
            with srv.smtp() as s:
                _, ehlo = s.ehlo("client.test")
                assert b"STARTTLS" in ehlo and b"AUTH" not in ehlo, ehlo
                assert s.docmd("MAIL", "FROM:<alerts@contoso.com>") == (
                    530,
                    b"5.7.0 Must issue a STARTTLS command first",
                )
                code, reply = s.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode())
                assert code == 530 and reply.startswith(b"5.7.0"), (code, reply)

        def untrusted_ca_refused() -> None:
            with srv.smtp() as s:
                s.ehlo("client.test")
                expect(ssl.SSLCertVerificationError, lambda: s.starttls(context=ssl.create_default_context()))

        def starttls_auth_send() -> None:
            with srv.smtp() as s:
                s.ehlo("client.test")
                assert s.starttls(context=trust)[0] == 220
                _, ehlo = s.ehlo("client.test")
                assert b"AUTH LOGIN PLAIN" in ehlo and b"STARTTLS" not in ehlo, ehlo
                assert s.docmd("MAIL", "FROM:<alerts@contoso.com>") == (
                    530,
                    b"5.7.57 Client not authenticated to send mail",
                )
                s.user, s.password = "alice", "wrong"
                err = expect(smtplib.SMTPAuthenticationError, lambda: s.auth("PLAIN", s.auth_plain))
                assert err.smtp_code == 535 and err.smtp_error.startswith(b"5.7.8"), err
                s.user, s.password = "alice", PASSWORD
                assert s.auth("PLAIN", s.auth_plain)[0] == 235
                s.mail("alerts@contoso.com")
                s.rcpt("ops@contoso.com")
                code, _ = s.data(message("over starttls", "<tls@mailroom.test>"))
            assert code == 250
            [record] = srv.messages()
            assert record["tls"] is True and record["tls_version"] in ("TLSv1.2", "TLSv1.3"), record
            assert record["auth_user"] == "alice", record

        for name, fn in [
            ("MAIL and AUTH refused before STARTTLS (530 5.7.0)", refused_before_tls),
            ("certificate not trusted without DIR/ca.pem", untrusted_ca_refused),
            ("STARTTLS trusting DIR/ca.pem, 530 5.7.57 before AUTH, bad then good AUTH, send", starttls_auth_send),
        ]:
            suite.check(f"starttls: {name}", fn)
    finally:
        code = srv.stop()
    suite.check("starttls: SIGTERM exits 0", lambda: _stopped(srv, code))


def implicit_checks(suite: Suite, root: Path) -> None:
    srv = Server("implicit", root, "--self-signed", "--implicit-tls")
    trust = ssl.create_default_context(cafile=str(srv.state / "ca.pem"))
    try:

        def implicit_send() -> None:
            with smtplib.SMTP_SSL("127.0.0.1", srv.smtp_port, context=trust, timeout=10) as s:
                _, ehlo = s.ehlo("client.test")
                assert b"STARTTLS" not in ehlo, ehlo
                s.mail("alerts@contoso.com")
                s.rcpt("ops@contoso.com")
                code, _ = s.data(message("implicit", "<implicit@mailroom.test>"))
            assert code == 250
            [record] = srv.messages()
            assert record["tls"] is True, record

        def plaintext_gets_no_greeting() -> None:
            expect(
                (smtplib.SMTPServerDisconnected, ConnectionError, TimeoutError),
                lambda: smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=1),
            )  # type: ignore[arg-type]

        suite.check("implicit TLS: send trusting DIR/ca.pem", implicit_send)
        suite.check("implicit TLS: a plaintext client gets no greeting", plaintext_gets_no_greeting)
    finally:
        code = srv.stop()
    suite.check("implicit TLS: SIGTERM exits 0", lambda: _stopped(srv, code))


def xoauth2_checks(suite: Suite, root: Path) -> None:
    now = int(time.time())
    good = {
        "active": True,
        "clientId": "11111111-1111-1111-1111-111111111111",
        "tenantId": "00000000-0000-0000-0000-000000000000",
        "roles": ["SMTP.SendAsApp"],
        "aud": OUTLOOK,
        "exp": now + 3600,
    }
    tokens = {
        "eyJ.good-token-7f3a.sig": good,
        "eyJ.graph-audience-token.sig": {**good, "aud": "https://graph.microsoft.com"},
        "eyJ.mail-send-only-token.sig": {**good, "roles": ["Mail.Send"]},
        # Exchange RBAC for Applications: no roles claim, SMTP.SendAsApp scoped to one mailbox.
        "eyJ.rbac-scoped-token.sig": {**good, "roles": [], "assigned": ["Alerts@Contoso.com"]},
        # A role in the token but no decision in the answer: the peer must not decide itself.
        "eyJ.undecided-token.sig": {**good, "undecided": True},
        "eyJ.us-cloud-token.sig": {**good, "aud": OUTLOOK_US},
        "eyJ.expired-token.sig": {**good, "exp": now - 10},
        "eyJ.inactive-token.sig": {"active": False},
        "eyJ.error-token.sig": "error",
    }
    fake = FakeIntrospection(root, tokens)
    srv = Server(
        "xoauth2",
        root,
        "--self-signed",
        "--require-starttls",
        "--require-auth",
        "--xoauth2-introspect",
        fake.url,
        "--xoauth2-ca",
        str(fake.ca),
    )
    trust = ssl.create_default_context(cafile=str(srv.state / "ca.pem"))

    def xoauth2(s: smtplib.SMTP, user: str, token: str) -> tuple[int, bytes]:
        blob = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        return s.docmd("AUTH", f"XOAUTH2 {blob}")

    def session() -> smtplib.SMTP:
        s = srv.smtp()
        s.ehlo("client.test")
        s.starttls(context=trust)
        s.ehlo("client.test")
        return s

    try:

        def good_token_sends() -> None:
            with session() as s:
                assert s.has_extn("auth") and s.esmtp_features["auth"].split() == ["XOAUTH2"], s.esmtp_features
                assert xoauth2(s, "alerts@contoso.com", "eyJ.good-token-7f3a.sig") == (
                    235,
                    b"2.7.0 Authentication successful",
                )
                s.mail("alerts@contoso.com")
                s.rcpt("ops@contoso.com")
                code, _ = s.data(message("xoauth2", "<xoauth2@mailroom.test>"))
            assert code == 250
            [record] = srv.messages()
            assert record["auth_user"] == "alerts@contoso.com" and record["auth_mechanism"] == "XOAUTH2", record
            assert record["auth_client_id"] == good["clientId"] and record["tls"] is True, record
            assert fake.requests[-1] == {
                "path": "/_emulator/introspect",
                "body": {
                    "token": "eyJ.good-token-7f3a.sig",
                    "mailbox": "alerts@contoso.com",
                    "permission": "SMTP.SendAsApp",
                },
                "type": "application/json",
            }, fake.requests[-1]

        def rbac_authorized_token_sends() -> None:
            srv.ok("POST", "/reset")
            with session() as s:
                assert xoauth2(s, "alerts@contoso.com", "eyJ.rbac-scoped-token.sig")[0] == 235
                s.mail("alerts@contoso.com")
                s.rcpt("ops@contoso.com")
                code, _ = s.data(message("xoauth2 rbac", "<xoauth2-rbac@mailroom.test>"))
            assert code == 250
            [record] = srv.messages()
            assert record["auth_user"] == "alerts@contoso.com" and record["auth_client_id"] == good["clientId"], record
            assert fake.requests[-1]["body"]["mailbox"] == "alerts@contoso.com", fake.requests[-1]

        def rbac_scope_refuses_other_mailboxes() -> None:
            with session() as s:
                reply = xoauth2(s, "ceo@contoso.com", "eyJ.rbac-scoped-token.sig")
                assert reply == (535, b"5.7.3 Authentication unsuccessful"), reply
                assert s.docmd("MAIL", "FROM:<ceo@contoso.com>")[0] == 530
            assert fake.requests[-1]["body"] == {
                "token": "eyJ.rbac-scoped-token.sig",
                "mailbox": "ceo@contoso.com",
                "permission": "SMTP.SendAsApp",
            }, fake.requests[-1]
            assert "AUTH XOAUTH2 failed for ceo@contoso.com: no SMTP.SendAsApp" in srv.log_text()

        def refused_tokens() -> None:
            for token in (
                "eyJ.graph-audience-token.sig",
                "eyJ.mail-send-only-token.sig",
                "eyJ.undecided-token.sig",
                "eyJ.us-cloud-token.sig",
                "eyJ.expired-token.sig",
                "eyJ.inactive-token.sig",
                "eyJ.unknown-token.sig",
            ):
                with session() as s:
                    reply = xoauth2(s, "alerts@contoso.com", token)
                    assert reply == (535, b"5.7.3 Authentication unsuccessful"), (token, reply)
                    assert s.docmd("MAIL", "FROM:<alerts@contoso.com>")[0] == 530

        def malformed() -> None:
            with session() as s:
                blob = base64.b64encode(b"user=alerts@contoso.com\x01\x01").decode()
                assert s.docmd("AUTH", f"XOAUTH2 {blob}") == (535, b"5.7.3 Authentication unsuccessful")

        def introspection_failure_is_temporary() -> None:
            with session() as s:
                assert xoauth2(s, "alerts@contoso.com", "eyJ.error-token.sig")[0] == 454

        def tokens_never_logged() -> None:
            log = srv.log_text()
            for token in tokens:
                assert token not in log, token
            assert "AUTH XOAUTH2 succeeded for alerts@contoso.com" in log, log

        for name, fn in [
            ("good token: 235, send, envelope names the app", good_token_sends),
            ("no role, SMTP.SendAsApp assigned in Exchange for the mailbox: 235, send", rbac_authorized_token_sends),
            ("no role, assignment scoped to another mailbox: 535 5.7.3", rbac_scope_refuses_other_mailboxes),
            ("wrong audience, not authorized, undecided, expired, inactive, unknown: 535 5.7.3", refused_tokens),
            ("malformed initial response: 535 5.7.3", malformed),
            ("introspection endpoint failing: 454", introspection_failure_is_temporary),
            ("tokens never logged", tokens_never_logged),
        ]:
            suite.check(f"xoauth2: {name}", fn)
    finally:
        code = srv.stop()
        fake.stop()
    suite.check("xoauth2: SIGTERM exits 0", lambda: _stopped(srv, code))


def national_cloud_checks(suite: Suite, root: Path) -> None:
    now = int(time.time())
    us = {
        "active": True,
        "clientId": "22222222-2222-2222-2222-222222222222",
        "roles": ["SMTP.SendAsApp"],
        "aud": OUTLOOK_US,
        "exp": now + 3600,
    }
    tokens = {"eyJ.gcc-high-token.sig": us, "eyJ.commercial-token.sig": {**us, "aud": OUTLOOK}}
    fake = FakeIntrospection(root / "cloud", tokens)
    srv = Server(
        "xoauth2-us",
        root,
        "--xoauth2-introspect",
        fake.url,
        "--xoauth2-ca",
        str(fake.ca),
        "--xoauth2-audience",
        OUTLOOK_US + "/",
    )

    def xoauth2(token: str) -> tuple[int, bytes]:
        with srv.smtp() as s:
            s.ehlo("client.test")
            blob = base64.b64encode(f"user=alerts@contoso.us\x01auth=Bearer {token}\x01\x01".encode()).decode()
            return s.docmd("AUTH", f"XOAUTH2 {blob}")

    try:

        def own_cloud_audience_accepted() -> None:
            assert xoauth2("eyJ.gcc-high-token.sig")[0] == 235

        def commercial_audience_refused() -> None:
            assert xoauth2("eyJ.commercial-token.sig") == (535, b"5.7.3 Authentication unsuccessful")
            assert f"is not {OUTLOOK_US}" in srv.log_text()

        suite.check("national cloud: --xoauth2-audience token accepted", own_cloud_audience_accepted)
        suite.check("national cloud: commercial audience refused: 535 5.7.3", commercial_audience_refused)
    finally:
        code = srv.stop()
        fake.stop()
    suite.check("national cloud: SIGTERM exits 0", lambda: _stopped(srv, code))

    def bad_command_lines() -> None:
        for args in (
            ["--xoauth2-audience", OUTLOOK_US],
            ["--xoauth2-introspect", fake.url, "--xoauth2-audience", "outlook"],
        ):
            proc = subprocess.run(
                [sys.executable, str(SERVER), "--state-dir", str(root / "bad"), *args],
                capture_output=True,
                timeout=30,
            )
            assert proc.returncode == 2 and b"--xoauth2-audience" in proc.stderr, (args, proc)

    suite.check("national cloud: --xoauth2-audience alone or not https: exit 2", bad_command_lines)


def address_checks(suite: Suite, root: Path) -> None:
    def loopback_only() -> None:
        assert smtp_server.parse_loopback("127.0.0.1:25") == ("127.0.0.1", 25)
        assert smtp_server.parse_loopback("[::1]:0") == ("::1", 0)
        expect(smtp_server.ConfigError, lambda: smtp_server.parse_loopback("10.213.0.1:25"))

    def private_when_allowed() -> None:
        assert smtp_server.parse_loopback("10.213.0.1:25", allow_private=True) == ("10.213.0.1", 25)
        assert smtp_server.parse_loopback("192.168.1.1:0", allow_private=True) == ("192.168.1.1", 0)
        for public in ("192.0.2.2:25", "8.8.8.8:25", "0.0.0.0:25", "[fd00::1]:25"):
            expect(smtp_server.ConfigError, lambda p=public: smtp_server.parse_loopback(p, allow_private=True))

    def certificate_names_the_listen_address() -> None:
        from cryptography import x509

        cert, _ = smtp_server.generate_self_signed(root / "addr-tls", root / "addr-ca.pem", "10.213.0.1")
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
        ips = {str(ip) for ip in leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)}
        assert ips == {"127.0.0.1", "::1", "10.213.0.1"}, ips

    suite.check("listen: loopback only by default", loopback_only)
    suite.check("listen: private addresses with --allow-private, never public ones", private_when_allowed)
    suite.check("listen: the certificate names the listen address", certificate_names_the_listen_address)


def session_limit_checks(suite: Suite, root: Path) -> None:
    srv = Server("limit", root, "--auth-user", "alice", "--auth-pass", PASSWORD, "--max-sessions-per-login", "2")
    try:

        def logged_in() -> smtplib.SMTP:
            s = srv.smtp()
            s.ehlo("client.test")
            s.login("alice", PASSWORD)
            return s

        def over_the_limit_gets_432() -> None:
            first, second, third = logged_in(), logged_in(), logged_in()
            code, reply = third.mail("alerts@contoso.com")
            assert (code, reply) == (432, b"4.3.2 Concurrent connections limit exceeded"), (code, reply)
            assert first.mail("alerts@contoso.com")[0] == 432, "every session of the login is over it"
            first.quit()
            assert third.mail("alerts@contoso.com")[0] == 250, "two left: within the limit"
            # Another login, or none, is not counted with alice's.
            anonymous = srv.smtp()
            anonymous.ehlo("client.test")
            assert anonymous.mail("alerts@contoso.com")[0] == 250
            for s in (second, third, anonymous):
                s.quit()
            assert srv.ok("GET", "/stats")["over_session_limit"] == 2

        suite.check("--max-sessions-per-login: 432 4.3.2 over it, per login", over_the_limit_gets_432)
    finally:
        code = srv.stop()
    suite.check("session limit: SIGTERM exits 0 and removes ready.json", lambda: _stopped(srv, code))


def main() -> int:
    suite = Suite()
    with tempfile.TemporaryDirectory(prefix="smtp-peer-selftest-") as tmp:
        root = Path(tmp)
        for group in (
            address_checks,
            plain_checks,
            session_limit_checks,
            starttls_checks,
            implicit_checks,
            xoauth2_checks,
            national_cloud_checks,
        ):
            try:
                group(suite, root)
            except Exception:
                suite.failed += 1
                print(f"FAIL {group.__name__} (setup)\n{traceback.format_exc()}", flush=True)
        if suite.failed or os.environ.get("SMTP_PEER_SELFTEST_LOGS"):
            for log in sorted(root.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')}")
    print(f"{suite.passed} passed, {suite.failed} failed")
    return 1 if suite.failed else 0


if __name__ == "__main__":
    sys.exit(main())
