"""A local stand-in for the Hugging Face Hub, for the upload tests (nothing leaves the machine).

It answers the HTTP endpoints that huggingface_hub's `create_repo` and `upload_folder` call, as
the Hub does: repo creation (409 when the repo exists), the preupload query (LFS for
`.safetensors` files, regular for the rest), the LFS batch API with the basic transfer (one PUT
per file, checked against its sha256) and the ndjson commit. huggingface_hub uploads LFS files
through Xet when hf_xet is installed; the tests turn that off, so this stand-in speaks the
legacy LFS protocol only.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "_create_repo"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/[^/]+$"), "_preupload"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "_lfs_batch"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "_lfs_put"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/[^/]+$"), "_commit"),
]


class HubStandIn:
    """The stand-in server on 127.0.0.1 and what it received.

    Attributes:
        url: the endpoint to give huggingface_hub (HF_ENDPOINT).
        repos: repo id -> the JSON body of its create request.
        files: repo id -> committed path -> content.
        lfs_paths: repo id -> the paths that came through the LFS protocol.
        commits: (repo id, commit summary) of every commit.
        authorizations: the Authorization headers of the Hub API requests (LFS storage PUTs
            carry none, as on the Hub).
        unexpected: requests no route answered (method and path).
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.lfs_paths: dict[str, set[str]] = {}
        self.commits: list[tuple[str, str]] = []
        self.authorizations: set[str] = set()
        self.unexpected: list[str] = []
        self._lfs_objects: dict[str, bytes] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        """(status, JSON answer) of a request."""
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                return getattr(self, name)(body, **match.groupdict())
        self.unexpected.append(f"{method} {path}")
        return 404, {"error": f"the stand-in does not serve {method} {path}"}

    def _create_repo(self, body: bytes) -> tuple[int, Any]:
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}"
        if repo_id in self.repos:
            return 409, {
                "error": "You already created this model repo",
                "url": self._repo_url(repo_id),
            }
        self.repos[repo_id] = request
        self.files[repo_id], self.lfs_paths[repo_id] = {}, set()
        return 200, {"url": self._repo_url(repo_id)}

    def _preupload(self, body: bytes, repo: str) -> tuple[int, Any]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        files = json.loads(body)["files"]
        modes = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                "shouldIgnore": False,
            }
            for f in files
        ]
        return 200, {"files": modes}

    def _lfs_batch(self, body: bytes, repo: str) -> tuple[int, Any]:
        request = json.loads(body)
        if request["operation"] != "upload" or "basic" not in request["transfers"]:
            return 400, {"error": f"the stand-in only takes basic LFS uploads, got {request}"}
        objects = [
            {
                "oid": obj["oid"],
                "size": obj["size"],
                "actions": {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"}},
            }
            for obj in request["objects"]
        ]
        return 200, {"transfer": "basic", "objects": objects}

    def _lfs_put(self, body: bytes, oid: str) -> tuple[int, Any]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "the content does not match its sha256"}
        self._lfs_objects[oid] = body
        return 200, {}

    def _commit(self, body: bytes, repo: str) -> tuple[int, Any]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        for line in body.splitlines():
            entry = json.loads(line)
            value = entry["value"]
            if entry["key"] == "header":
                self.commits.append((repo, value["summary"]))
            elif entry["key"] == "file":
                self.files[repo][value["path"]] = base64.b64decode(value["content"])
            elif entry["key"] == "lfsFile":
                if value["oid"] not in self._lfs_objects:
                    return 400, {"error": f"LFS object of {value['path']} was never uploaded"}
                self.files[repo][value["path"]] = self._lfs_objects[value["oid"]]
                self.lfs_paths[repo].add(value["path"])
            else:
                return 400, {"error": f"the stand-in does not handle {entry['key']}"}
        oid = hashlib.sha1(body).hexdigest()
        return 200, {"commitUrl": f"{self._repo_url(repo)}/commit/{oid}", "commitOid": oid}

    def _repo_url(self, repo_id: str) -> str:
        return f"{self.url}/{repo_id}"


def _handler_for(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self._serve()

        def do_PUT(self) -> None:
            self._serve()

        def _serve(self) -> None:
            if not self.path.startswith("/lfs-upload/"):  # storage takes no Hub token
                hub.authorizations.add(self.headers.get("Authorization", ""))
            status, answer = hub.answer(self.command, self.path.split("?")[0], self._body())
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))
            chunks = []
            while size := int(self.rfile.readline().strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            self.rfile.readline()  # the CRLF after the last, empty chunk
            return b"".join(chunks)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the tests assert on what arrived, not on the access log

    return Handler
