"""A byte-counting HTTP server for reading measurements: serves a local directory on 127.0.0.1 from a thread and
counts the body bytes it sends per path, as an object store would bill egress.

    with CountingServer("/tmp/cache-root") as server:      # the directory that holds the cache folder
        ds = KDCacheDataset(server.url + "/cache", ...)      # fsspec's http filesystem (aiohttp) reads it
        ...
        server.sent_bytes("cache/shards/")                   # bytes of the shards sent so far

GET (whole files and `Range: bytes=a-b`) and HEAD only; paths that leave the directory are refused. Used by
bench/reader.py and the cluster-reading tests.
"""

from __future__ import annotations

import os
import posixpath
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["CountingServer"]


class CountingServer:
    """Serve `root` over HTTP on 127.0.0.1 (a free port) while the context is open; see the module docstring."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.sent: Counter[str] = Counter()  # path relative to root -> body bytes sent
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def sent_bytes(self, prefix: str = "") -> int:
        """Body bytes sent for paths starting with `prefix` (relative to root)."""
        with self._lock:
            return sum(n for path, n in self.sent.items() if path.startswith(prefix))

    def reset(self) -> None:
        with self._lock:
            self.sent.clear()
            self.requests.clear()

    def _count(self, path: str, nbytes: int) -> None:
        with self._lock:
            self.sent[path] += nbytes
            self.requests[path] += 1

    def __enter__(self) -> CountingServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: aiohttp reuses connections

            def log_message(self, *args) -> None:  # no access log on stderr
                pass

            def _resolve(self) -> tuple[str, str] | None:
                rel = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/"))
                if rel.startswith("..") or rel.startswith("/"):
                    return None
                full = os.path.join(server.root, rel)
                return (rel, full) if os.path.isfile(full) else None

            def _reply(self, body: bool) -> None:
                found = self._resolve()
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                rel, full = found
                size = os.path.getsize(full)
                start, stop, status = 0, size, 200
                spec = self.headers.get("Range")
                if spec and spec.startswith("bytes="):
                    first, _, last = spec[len("bytes=") :].partition("-")
                    if first:
                        start, stop = int(first), min(size, int(last) + 1) if last else size
                    else:  # a suffix range: the last N bytes
                        start, stop = max(0, size - int(last)), size
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(max(0, stop - start)))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
                self.end_headers()
                if body and stop > start:
                    with open(full, "rb") as f:
                        f.seek(start)
                        data = f.read(stop - start)
                    self.wfile.write(data)
                    server._count(rel, len(data))

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._reply(body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._reply(body=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="counting-http", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
