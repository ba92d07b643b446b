"""A test-only Hugging Face Hub on 127.0.0.1: the HTTP routes the real ``huggingface_hub`` client
uses to create repos and branches, commit files (NDJSON, regular uploads), open pull requests,
read repo/revision info and trees, and resolve files.

Why a server of our own: the Hub cannot be reached from these machines, and no PyPI package
offers a local Hub that accepts uploads (``olah`` only mirrors downloads). Everything above the
HTTP layer -- ``HfApi``, ``hf_hub_download``, ``snapshot_download``, timm's and transformers'
loaders -- is the real code. Storage is in memory: repos, commits (file path -> git blob oid),
blobs and refs (branches and ``refs/pr/N``). Write routes and private repos need the token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubState:
    def __init__(self, token: str):
        self.token = token
        self.repos: Dict[str, dict] = {}
        self.blobs: Dict[str, bytes] = {}
        self.commits: Dict[str, dict] = {}
        self.lock = threading.Lock()
        self.requests = []  # (method, path) log, for tests that check what the client did

    def new_commit(self, files: Dict[str, str], parent: Optional[str], message: str) -> str:
        body = json.dumps({"files": files, "parent": parent, "message": message, "t": time.time_ns()}, sort_keys=True)
        oid = hashlib.sha1(body.encode()).hexdigest()
        self.commits[oid] = {"files": dict(files), "parent": parent, "message": message}
        return oid

    def resolve(self, repo: dict, revision: str) -> Optional[str]:
        if revision in repo["refs"]:
            return repo["refs"][revision]
        if revision in self.commits and revision in repo["history"]:
            return revision
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState
    endpoint: str

    def log_message(self, *args):  # keep test output clean
        pass

    # -- plumbing -----------------------------------------------------------------------------
    def _send(self, status: int, body=b"", headers=None, head_only=False):
        if not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, head_only=False):
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head_only)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.state.token}"

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _repo(self, repo_id: str, write=False, head_only=False) -> Optional[dict]:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo["private"] and not self._authorized()):
            self._error(404 if repo is None else 401, "RepoNotFound", f"Repository Not Found for url: {self.path}.",
                        head_only)
            return None
        if write and not self._authorized():
            self._error(401, "RepoNotFound", "Invalid credentials in Authorization header", head_only)
            return None
        return repo

    def _split(self):
        parts = urlsplit(self.path)
        return [unquote(p) for p in parts.path.split("/")[1:]], parse_qs(parts.query)

    # -- routes -------------------------------------------------------------------------------
    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str):
        segments, query = self._split()
        with self.state.lock:
            self.state.requests.append((method, self.path))
            if method == "POST" and segments[:3] == ["api", "repos", "create"]:
                return self._create_repo()
            if method == "POST" and segments[:2] == ["api", "validate-yaml"]:
                self._body()
                return self._send(200, {"errors": [], "warnings": []})
            if segments[:2] == ["api", "models"] and len(segments) >= 4:
                repo_id, rest = f"{segments[2]}/{segments[3]}", segments[4:]
                if not rest and method == "GET":
                    return self._info(repo_id, "main")
                if rest[0] == "revision" and method == "GET":
                    return self._info(repo_id, "/".join(rest[1:]))
                if rest[0] == "tree" and method == "GET":
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]))
                if rest[0] == "preupload" and method == "POST":
                    return self._preupload(repo_id, "/".join(rest[1:]))
                if rest[0] == "commit" and method == "POST":
                    return self._commit(repo_id, "/".join(rest[1:]), "1" in query.get("create_pr", []))
                if rest[0] == "branch" and method == "POST":
                    return self._branch(repo_id, "/".join(rest[1:]))
                if rest[0] == "refs" and method == "GET":
                    return self._refs(repo_id)
            if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]),
                                     head_only=method == "HEAD")
            self._body()
            self._error(404, "EntryNotFound", f"no route {method} {self.path}", method == "HEAD")

    def _create_repo(self):
        payload = json.loads(self._body() or b"{}")
        if not self._authorized():
            return self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        if repo_id in self.state.repos:
            return self._send(409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        self.state.blobs[git_blob_oid(gitattributes)] = gitattributes
        first = self.state.new_commit({".gitattributes": git_blob_oid(gitattributes)}, None, "initial commit")
        self.state.repos[repo_id] = {"private": private, "refs": {"main": first}, "history": {first}, "prs": 0}
        self._send(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id})

    def _revision(self, repo_id: str, revision: str, head_only=False):
        """``(repo, commit oid)``, or ``None`` after sending the Hub's error for a bad repo or revision."""
        repo = self._repo(repo_id, head_only=head_only)
        if repo is None:
            return None
        oid = self.state.resolve(repo, revision)
        if oid is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head_only)
            return None
        return repo, oid

    def _info(self, repo_id: str, revision: str):
        found = self._revision(repo_id, revision)
        if found is None:
            return
        repo, oid = found
        files = self.state.commits[oid]["files"]
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": oid, "private": repo["private"],
                         "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0,
                         "likes": 0, "lastModified": "2026-01-01T00:00:00.000Z"})

    def _tree(self, repo_id: str, revision: str, prefix: str):
        found = self._revision(repo_id, revision)
        if found is None:
            return
        files = self.state.commits[found[1]]["files"]
        entries = [{"type": "file", "path": p, "oid": b, "size": len(self.state.blobs[b])}
                   for p, b in sorted(files.items()) if not prefix or p.startswith(prefix.rstrip("/") + "/")]
        self._send(200, entries)

    def _preupload(self, repo_id: str, revision: str):
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        oid = self.state.resolve(repo, revision) or repo["refs"]["main"]
        files = self.state.commits[oid]["files"]
        self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": files.get(f["path"])} for f in payload["files"]]})

    def _commit(self, repo_id: str, revision: str, create_pr: bool):
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        parent = self.state.resolve(repo, revision)
        if parent is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = dict(self.state.commits[parent]["files"])
        header = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                self.state.blobs[git_blob_oid(data)] = data
                files[value["path"]] = git_blob_oid(data)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                return self._error(400, "BadRequest", f"this test Hub does not support {key!r} operations")
        oid = self.state.new_commit(files, parent, header.get("summary", ""))
        repo["history"].add(oid)
        body = {"commitOid": oid, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "success": True}
        if create_pr:
            repo["prs"] += 1
            repo["refs"][f"refs/pr/{repo['prs']}"] = oid
            body["pullRequestUrl"] = f"{self.endpoint}/{repo_id}/discussions/{repo['prs']}"
        else:
            repo["refs"][revision] = oid
        self._send(200, body)

    def _branch(self, repo_id: str, branch: str):
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if branch in repo["refs"]:
            return self._error(409, "Conflict", f"Reference already exists: refs/heads/{branch}")
        start = self.state.resolve(repo, payload.get("startingPoint") or "main")
        repo["refs"][branch] = start
        self._send(200, {})

    def _refs(self, repo_id: str):
        repo = self._repo(repo_id)
        if repo is None:
            return
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo["refs"].items()
                    if not n.startswith("refs/")]
        prs = [{"name": n, "ref": n, "targetCommit": o} for n, o in repo["refs"].items() if n.startswith("refs/pr/")]
        self._send(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def _resolve(self, repo_id: str, revision: str, path: str, head_only: bool):
        found = self._revision(repo_id, revision, head_only)
        if found is None:
            return
        oid = found[1]
        blob = self.state.commits[oid]["files"].get(path)
        if blob is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", head_only)
        data = self.state.blobs[blob]
        self._send(200, data, {"X-Repo-Commit": oid, "ETag": f'"{blob}"', "Content-Type": "application/octet-stream"},
                   head_only)


class LocalHub:
    """``with LocalHub(token) as hub:`` serves on ``hub.endpoint`` until the block ends."""

    def __init__(self, token: str = "hf_local_test_token", port: int = 0):
        self.state = HubState(token)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        handler.endpoint = self.endpoint
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def corrupt(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> str:
        """Commit ``data`` as ``path`` directly (a damaged upload), bypassing the client."""
        with self.state.lock:
            repo = self.state.repos[repo_id]
            files = dict(self.state.commits[repo["refs"][revision]]["files"])
            self.state.blobs[git_blob_oid(data)] = data
            files[path] = git_blob_oid(data)
            oid = self.state.new_commit(files, repo["refs"][revision], f"corrupt {path}")
            repo["history"].add(oid)
            repo["refs"][revision] = oid
            return oid
