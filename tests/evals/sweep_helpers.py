"""Helpers of the sweep tests: grid files as text, a loopback OpenAI-style judge that records the keys it is
sent, reading a sweep's cell predictions, and a grep of every file under a folder."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from kvtool.evals.runner import read_predictions


def grid_text(models: dict[str, tuple[str, str]], blocks: list[dict], tasks=("shapes",), reference="a",
              **top) -> str:
    """A grid file: ``models`` name -> (path, backend); ``blocks`` the [[kv]] tables; ``top`` the top keys."""
    lines = [f"tasks = {json.dumps(list(tasks))}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in top.items() if not isinstance(v, dict)]
    for k, v in top.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
    for name, (path, backend) in models.items():
        lines += [f"[models.{name}]", f"path = {json.dumps(str(path))}", f"backend = \"{backend}\""]
    lines += ["[reference]", f"model = \"{reference}\""]
    for b in blocks:
        lines += ["[[kv]]"] + [f"{k} = {json.dumps(v)}" for k, v in b.items()]
    return "\n".join(lines) + "\n"


def cell_predictions(out: Path, cell: str, task: str = "shapes") -> dict[str, str]:
    return {r["id"]: r["prediction"] for r in read_predictions(out / "cells" / cell / task / "predictions.jsonl")}


def files_containing(root: Path, needle: str) -> list[str]:
    hits = []
    for f in Path(root).rglob("*"):
        if f.is_file() and not f.is_symlink():
            try:
                if needle.encode() in f.read_bytes():
                    hits.append(str(f))
            except OSError:
                continue
    return hits


class JudgeServer:
    """A loopback /v1/chat/completions endpoint replying "0.5"; records each request's Authorization header."""

    def __init__(self) -> None:
        seen = self.auth = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                seen.append(self.headers.get("Authorization"))
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.dumps({"choices": [{"message": {"content": "0.5"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
