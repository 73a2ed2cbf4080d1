"""Real servers on 127.0.0.1 for the remote tests: a static HTTP server that can inject faults, and
moto's S3-compatible server. Each is stopped by the fixture that started it."""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Faults:
    """What the server does wrong, per file name: ``errors`` (that many 5xx answers first), ``cut``
    (close the connection after that many bytes, once), ``flip`` (flip the byte at that offset;
    ``flip_times`` answers, -1 for always), ``endless`` (after the file, zeros without end, no
    Content-Length), ``stall`` (send that many bytes, then nothing for ``stall_s`` seconds)."""

    def __init__(self):
        self.errors: dict[str, int] = {}
        self.cut: dict[str, int] = {}
        self.flip: dict[str, int] = {}
        self.flip_times: dict[str, int] = {}
        self.endless: set[str] = set()
        self.stall: dict[str, int] = {}
        self.stall_s = 5.0
        self.requests: list[str] = []
        self.lock = threading.Lock()


def _handler(root: str, faults: Faults):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            name = self.path.lstrip("/").split("?")[0]
            path = os.path.join(root, name)
            with faults.lock:
                faults.requests.append(name)
                if faults.errors.get(name, 0) > 0:
                    faults.errors[name] -= 1
                    self.send_error(503, "injected")
                    return
                cut = faults.cut.pop(name, None) if body else None
                flip = faults.flip.get(name) if body else None
                if flip is not None and faults.flip_times.get(name, -1) != 0:
                    faults.flip_times[name] = faults.flip_times.get(name, -1) - (name in faults.flip_times)
                else:
                    flip = None
            if not os.path.isfile(path):
                self.send_error(404)
                return
            data = bytearray(open(path, "rb").read())
            if flip is not None:
                data[flip] ^= 0x01
            if name in faults.endless and body:
                self._send_endless(bytes(data))
                return
            if name in faults.stall and body:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(bytes(data[:faults.stall[name]]))
                self.wfile.flush()
                time.sleep(faults.stall_s)
                self.close_connection = True
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(bytes(data[:cut]) if cut is not None else bytes(data))
                if cut is not None:
                    self.close_connection = True

        def _send_endless(self, data: bytes):
            """The file, then zeros until the client hangs up (bounded: 64 MB), chunked."""
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for chunk in [data] + [bytes(1 << 16)] * 1024:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

    return Handler


class StaticServer:
    """``http://127.0.0.1:PORT/`` serving ``root``, in a thread."""

    def __init__(self, root: str):
        self.faults = Faults()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, self.faults))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
        if not self.thread.is_alive():
            return
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
