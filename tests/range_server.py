"""A loopback HTTP server for tests/test_remote.py, run in its own process (GDAL may hold the
GIL during network I/O, so an in-process server thread could stall it).

``python tests/range_server.py ROOT`` serves ``ROOT/<name>`` at ``/data/<name>`` with HEAD and
single-range GET (206 + Content-Range), prints its port, and answers ``/_stats`` with the body
bytes served per path, every path asked for (404s included) and the Range headers received.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def main(root: Path) -> None:
    stats: dict = {"served": {}, "paths": [], "requests": []}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a connection may idle: no client waits on a stuck socket

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(code)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _target(self) -> tuple[str, Path | None]:
            path = self.path.split("?", 1)[0]
            if path == "/_stats":
                return path, None
            with lock:
                stats["paths"].append(path)
            name = path.removeprefix("/data/")
            local = root / name
            ok = path.startswith("/data/") and "/" not in name and local.is_file()
            return path, local if ok else None

        def do_HEAD(self) -> None:  # noqa: N802
            path, local = self._target()
            if local is None:
                self._send(404, b"", {})
                return
            size = local.stat().st_size
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            path, local = self._target()
            if path == "/_stats":
                with lock:
                    body = json.dumps(stats).encode()
                self._send(200, body, {"Content-Type": "application/json"})
                return
            if local is None:
                self._send(404, b"", {})
                return
            data = local.read_bytes()
            match = RANGE.match(self.headers.get("Range", ""))
            headers = {"Accept-Ranges": "bytes"}
            code = 200
            if match:
                start = int(match.group(1))
                end = min(int(match.group(2) or len(data) - 1), len(data) - 1)
                data = data[start : end + 1]
                code = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{local.stat().st_size}"
            with lock:  # counted as sent even if the client hangs up early
                stats["served"][path] = stats["served"].get(path, 0) + len(data)
                stats["requests"].append(self.headers.get("Range", "whole file"))
            self._send(code, data, headers)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
