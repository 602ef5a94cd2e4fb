"""Submits one message to mailroom's SMTP listener with Python's smtplib, as a real client would.

Usage: smtp_submit.py '<JSON settings>'. Settings: host, port, mode ("starttls", "ssl" or
"plain": no TLS at all), cafile, username and password (omit to skip AUTH), from, to (a list),
message (a file with the RFC 5322 message), attempts (default 1) and delay (seconds between them).

Each attempt prints one JSON line: {"attempt": n, "stage": "...", "code": ..., "reply": "..."}.
A 4xx reply or a lost connection is tried again, as a mail program retries; a 2xx at DATA or a 5xx
ends it. The exit status is 0 unless the settings are wrong.
"""

import json
import smtplib
import ssl
import sys
import time


def attempt(s):
    ctx = ssl.create_default_context(cafile=s["cafile"]) if s.get("cafile") else None
    stage = "connect"
    try:
        if s.get("mode") == "ssl":
            conn = smtplib.SMTP_SSL(s["host"], s["port"], context=ctx, timeout=60)
        else:
            conn = smtplib.SMTP(s["host"], s["port"], timeout=60)
        with conn:
            stage = "ehlo"
            conn.ehlo("client.test")
            if s.get("mode") == "starttls":
                stage = "starttls"
                code, reply = conn.starttls(context=ctx)
                conn.ehlo("client.test")
            if "username" in s:
                stage = "auth"
                try:
                    conn.login(s["username"], s["password"])
                except smtplib.SMTPAuthenticationError as e:
                    return stage, e.smtp_code, e.smtp_error.decode()
                except smtplib.SMTPNotSupportedError as e:
                    return stage, 0, str(e)
            stage = "mail"
            code, reply = conn.mail(s["from"])
            if code != 250:
                return stage, code, reply.decode()
            stage = "rcpt"
            for to in s["to"]:
                code, reply = conn.rcpt(to)
                if code not in (250, 251):
                    return stage, code, reply.decode()
            stage = "data"
            with open(s["message"], "rb") as f:
                code, reply = conn.data(f.read())
            return stage, code, reply.decode()
    except smtplib.SMTPResponseException as e:
        return stage, e.smtp_code, e.smtp_error.decode(errors="replace")
    except (smtplib.SMTPServerDisconnected, ConnectionError, OSError) as e:
        return stage, None, f"{type(e).__name__}: {e}"


def main():
    s = json.loads(sys.argv[1])
    for n in range(1, int(s.get("attempts", 1)) + 1):
        stage, code, reply = attempt(s)
        print(json.dumps({"attempt": n, "stage": stage, "code": code, "reply": reply}), flush=True)
        if code is not None and (code < 400 or code >= 500) and not (stage == "data" and code == 354):
            return
        time.sleep(float(s.get("delay", 1)))


if __name__ == "__main__":
    main()
