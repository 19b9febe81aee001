"""A small loopback HTTP proxy in front of moto that injects S3 faults on request.

Rules fire a bounded number of times on requests matching (method, path/query regex, and
optionally a Range header regex: a header read starts at byte 0, a tensor read further on):
  "503"       -> 503 ServiceUnavailable (transient)
  "slowdown"  -> 503 SlowDown (throttling, transient)
  "403"       -> 403 AccessDenied (permanent)
  "expired"   -> 400 ExpiredToken (a session token that ran out: permanent)
  "drop"      -> the connection is closed before any response (connection reset)
  "cut_body"  -> forwarded, but the response body is cut in half (reset mid-download)
Every request is logged (method, path, headers) so tests can count attempts.
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal, Self

__all__ = ["FaultProxy", "Rule", "Seen"]

Action = Literal["503", "slowdown", "403", "expired", "drop", "cut_body"]
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_ERRORS = {
    "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
    "expired": (400, "ExpiredToken", "The provided token has expired."),
}


@dataclass
class Rule:
    action: Action
    method: str = ".*"
    path: str = ".*"  # regex searched in "path?query"
    times: int = 1  # how many matching requests it hits
    range: str | None = None  # regex searched in the Range header (None: any request, ranged or not)
    hits: int = 0

    def matches(self, method: str, path: str, range_header: str | None = None) -> bool:
        return (
            self.hits < self.times
            and re.fullmatch(self.method, method) is not None
            and re.search(self.path, path) is not None
            and (self.range is None or re.search(self.range, range_header or "") is not None)
        )


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body_len: int = 0
    fault: str | None = None


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30  # bounded: a stuck client cannot pin a thread forever

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add(self, action: Action, *, method: str = ".*", path: str = ".*", times: int = 1,
            range: str | None = None) -> Rule:
        rule = Rule(action=action, method=method, path=path, times=times, range=range)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.seen.clear()

    def count(self, method: str, path: str = ".*") -> int:
        with self.lock:
            return sum(1 for s in self.seen if s.method == method and re.search(path, s.path) is not None)

    def _pick(self, method: str, path: str, seen: Seen) -> Rule | None:
        with self.lock:
            self.seen.append(seen)
            for rule in self.rules:
                if rule.matches(method, path, seen.headers.get("range")):
                    rule.hits += 1
                    seen.fault = rule.action
                    return rule
        return None

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        seen = Seen(h.command, h.path, {k.lower(): v for k, v in h.headers.items()}, len(body))
        rule = self._pick(h.command, h.path, seen)
        if rule is not None and rule.action == "drop":
            return  # no response at all; the socket is closed
        if rule is not None and rule.action in _ERRORS:
            status, code, message = _ERRORS[rule.action]
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>"
            ).encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.send_header("Connection", "close")
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            return
        self._forward(h, body, cut=rule is not None)

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes, *, cut: bool) -> None:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            # A HEAD response's Content-Length is the object's size: pass it through.
            if k.lower() not in _HOP and (k.lower() != "content-length" or h.command == "HEAD"):
                h.send_header(k, v)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.send_header("Connection", "close")
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data[: len(data) // 2] if cut else data)

    def start(self) -> Self:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
