"""A local HTTP server on 127.0.0.1 for download tests (no network needed)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest


class Server:
    """``routes`` maps a path to bytes (served with Content-Length), to a failure mode
    (``"short"``, ``"chunked-cut"``, ``"garbage"``) or to a function of the request handler."""

    def __init__(self, routes: dict[str, object]) -> None:
        self.routes = routes
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                try:
                    self._answer()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a deadline, a refused download): expected in these tests

            def _answer(self) -> None:
                owner.requests.append(self.path)
                body = owner.routes.get(self.path)
                if isinstance(body, bytes):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif callable(body):
                    body(self)
                elif body == "short":  # promises 100000 bytes, sends 1000, hangs up
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"x" * 1000)
                    self.close_connection = True
                elif body == "chunked-cut":  # one chunk, then hangs up mid-body
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
                    self.close_connection = True
                elif body == "garbage":  # not HTTP at all
                    self.wfile.write(b"hello there\r\n\r\n")
                    self.close_connection = True
                else:
                    self.send_error(404)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)


def send(handler, body: bytes, *, content_type: str = "application/octet-stream", length: bool = True) -> None:
    """Answer 200 with ``body``; without ``length`` the end of the body is the end of the connection."""
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
    handler.close_connection = True


@pytest.fixture
def serve():
    """``serve(routes)`` starts a :class:`Server`; every one is stopped after the test."""
    servers: list[Server] = []

    def start(routes):
        servers.append(Server(routes))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty download cache of the test's own (``$ATTNLAB_CACHE``)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ATTNLAB_CACHE", str(root))
    return root
