"""A local fake of the Kaggle API server and the `fake_kaggle` fixture that uses it.

The official client (kaggle 2.x over kagglesdk) and kagglehub send every call as
`POST <endpoint>/api/v1/<service>/<Method>` with a JSON body, and upload files in two steps:
`StartBlobUpload` (or `StartSubmissionUpload`) returns a token and a `createUrl`, then the file is
PUT to that URL and the token is named in the final request. The fake implements the methods
that publishing uses (datasets and their status; kernels, their status, log and metadata; file
and code submissions and the list of submissions; Models and Model instances), answers with
the JSON the clients expect, and records every request and upload, so tests can check what
would have reached kaggle.com without any network.

Processing takes time on Kaggle: `dataset_progress`, `kernel_progress` and
`submission_progress` give the statuses successive status calls answer (the last one stays).

Use it from a test module with

    pytest_plugins = ["fake_kaggle"]

    def test_push(fake_kaggle):
        fake_kaggle.fail("CreateDataset", 500, "quota exceeded")
        ...
        assert fake_kaggle.calls("SaveKernel")[0]["enableInternet"] is False

The fixture sets fake credentials (KAGGLE_USERNAME / KAGGLE_KEY), an empty KAGGLE_CONFIG_DIR and
HOME under tmp_path, KAGGLE_API_ENVIRONMENT=LOCALHOST, and points every entry of kagglesdk's
endpoint table at the fake: LOCALHOST alone means http://localhost on port 80, and patching the
production entry too means a stray client can never reach kaggle.com from a test.
"""

from __future__ import annotations

import base64
import json
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

USERNAME = "kseg-tester"
KEY = "fake-kaggle-key"
TOKEN = "KGAT_fake_access_token"

UPLOAD = "upload"  # the endpoint name under which file PUTs are recorded and can be failed


@dataclass
class Request:
    """One request the fake received. `endpoint` is the method name, e.g. "CreateDataset"."""

    method: str
    path: str
    endpoint: str
    body: Any
    user: str | None


@dataclass
class Upload:
    """A file PUT to an upload URL; `name` is the file name given when the upload was started."""

    token: str
    name: str
    declared_size: int
    data: bytes = b""
    done: bool = False

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class Failure:
    status: int
    message: str
    times: int | None  # None: every time


@dataclass
class FakeKaggle:
    """The fake server's state: what it knows, what it was sent, what it should refuse."""

    credentials: dict[str, str] = field(default_factory=lambda: {USERNAME: KEY})
    tokens: dict[str, str] = field(default_factory=lambda: {TOKEN: USERNAME})
    datasets: set[str] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    uploads: dict[str, Upload] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    kernel_versions: dict[str, int] = field(default_factory=dict)
    kernels: dict[str, dict[str, Any]] = field(default_factory=dict)  # owner/slug -> SaveKernel
    dataset_progress: dict[str, list[str]] = field(default_factory=dict)
    kernel_progress: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)
    kernel_logs: dict[str, str] = field(default_factory=dict)  # owner/slug -> printed text
    submissions: dict[int, dict[str, Any]] = field(default_factory=dict)
    submission_progress: dict[int, list[tuple[str, str | None]]] = field(default_factory=dict)
    models: set[str] = field(default_factory=set)  # owner/model
    model_instances: dict[str, int] = field(default_factory=dict)  # .../framework/slug -> version
    url: str = ""
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- control, for tests ----

    def start(self) -> FakeKaggle:
        """Serve on 127.0.0.1 at a free port, in a daemon thread; sets `url`."""
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port: later calls get "connection refused"."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def fail(self, endpoint: str, status: int, message: str, *, times: int | None = None) -> None:
        """Answer `endpoint` (a method name such as "SaveKernel", or "upload" for file PUTs)
        with HTTP `status` and `{"code": status, "message": message}`, `times` times or always."""
        self.failures[endpoint] = Failure(status, message, times)

    def reply(self, endpoint: str, body: dict[str, Any]) -> None:
        """Answer `endpoint` with this JSON body (status 200) instead of the default one."""
        self.replies[endpoint] = body

    def add_dataset(self, ref: str) -> None:
        """Make dataset `owner/slug` exist, so a push creates a new version of it."""
        self.datasets.add(ref)

    def progress(self, table: dict, key: Any, default: Any) -> Any:
        """The next status of `key` in `table` (a list consumed per call, its last item kept)."""
        steps = table.get(key)
        if not steps:
            return default
        return steps.pop(0) if len(steps) > 1 else steps[0]

    # ---- inspection, for tests ----

    def endpoints(self) -> list[str]:
        """Method names in the order they were called, uploads included."""
        return [request.endpoint for request in self.requests]

    def calls(self, endpoint: str) -> list[Any]:
        """The JSON bodies sent to `endpoint`, in order."""
        return [request.body for request in self.requests if request.endpoint == endpoint]

    def uploaded(self) -> dict[str, Upload]:
        """Completed uploads by file name."""
        return {upload.name: upload for upload in self.uploads.values() if upload.done}

    def upload_for(self, token: str) -> Upload:
        return self.uploads[token]

    # ---- serving ----

    def _failure(self, endpoint: str) -> Failure | None:
        failure = self.failures.get(endpoint)
        if failure is None:
            return None
        if failure.times is not None:
            failure.times -= 1
            if failure.times <= 0:
                del self.failures[endpoint]
        return failure

    def _new_upload(self, name: str, size: int) -> dict[str, str]:
        token = f"blob-{len(self.uploads) + 1}-{name}"
        self.uploads[token] = Upload(token=token, name=name, declared_size=size)
        return {"token": token, "createUrl": f"{self.url}/upload/{token}"}

    def _answer(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The default answer of each implemented method: (status, JSON)."""
        if endpoint == "IntrospectToken":
            username = self.tokens.get(body.get("token", ""))
            if username is None:
                return 200, {"active": False}
            return 200, {"active": True, "username": username, "clientId": "fake"}
        if endpoint == "GetDatasetStatus":
            ref = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
            if ref not in self.datasets:
                return 404, {"code": 404, "message": f"Dataset {ref} not found"}
            return 200, {"status": self.progress(self.dataset_progress, ref, "READY")}
        if endpoint in ("StartBlobUpload", "StartSubmissionUpload"):
            name = body.get("name") or body.get("fileName") or "unnamed"
            return 200, self._new_upload(name, int(body.get("contentLength", 0)))
        if endpoint == "CreateDataset":
            ref = f"{body.get('ownerSlug')}/{body.get('slug')}"
            if missing := self._missing_tokens(file["token"] for file in body.get("files", [])):
                return 400, {"code": 400, "message": f"unknown upload tokens {missing}"}
            self.datasets.add(ref)
            return 200, {"ref": ref, "url": f"{self.url}/datasets/{ref}", "status": "ok"}
        if endpoint == "CreateDatasetVersion":
            ref = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
            if ref not in self.datasets:
                return 404, {"code": 404, "message": f"Dataset {ref} not found"}
            files = body.get("body", {}).get("files", [])
            if missing := self._missing_tokens(file["token"] for file in files):
                return 400, {"code": 400, "message": f"unknown upload tokens {missing}"}
            return 200, {"ref": ref, "url": f"{self.url}/datasets/{ref}", "status": "ok"}
        if endpoint == "SaveKernel":
            slug = body.get("slug") or str(body.get("id"))
            version = self.kernel_versions.get(slug, 0) + 1
            self.kernel_versions[slug] = version
            self.kernels[slug] = body
            return 200, {
                "ref": f"/code/{slug}",
                "url": f"{self.url}/code/{slug}",
                "versionNumber": version,
                "kernelId": 1000 + len(self.kernel_versions),
            }
        if endpoint == "CreateSubmission":
            token = body.get("blobFileTokens", "")
            if self._missing_tokens([token]):
                return 400, {"code": 400, "message": f"unknown upload token {token!r}"}
            competition = body.get("competitionName")
            return 200, {"message": f"Successfully submitted to {competition}", "ref": 4242}
        if endpoint == "CreateCodeSubmission":
            competition = body.get("competitionName")
            ref = 4343 + len(self.submissions)
            self.submissions[ref] = {"competition": competition, **body}
            return 200, {"message": f"Your kernel was submitted to {competition}", "ref": ref}
        return self._answer_more(endpoint, body)

    def _answer_more(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Kernel status, log and metadata; the list of submissions; Models."""
        kernel = f"{body.get('userName')}/{body.get('kernelSlug')}"
        if endpoint == "GetKernelSessionStatus":
            if kernel not in self.kernels:
                return 404, {"code": 404, "message": f"Kernel {kernel} not found"}
            status, failure = self.progress(self.kernel_progress, kernel, ("COMPLETE", None))
            return 200, {"status": status, **({"failureMessage": failure} if failure else {})}
        if endpoint == "ListKernelSessionOutput":
            lines = self.kernel_logs.get(kernel, "").splitlines()
            log = [
                {"stream_name": "stdout", "time": i, "data": f"{line}\n"}
                for i, line in enumerate(lines)
            ]
            return 200, {"files": [], "log": json.dumps(log)}
        if endpoint == "GetKernel":
            saved = self.kernels.get(kernel)
            if saved is None:
                return 404, {"code": 404, "message": f"Kernel {kernel} not found"}
            return 200, _kernel_answer(kernel, saved)
        if endpoint == "ListSubmissions":
            listed = []
            for ref, entry in self.submissions.items():
                if entry["competition"] != body.get("competitionName"):
                    continue
                status, score = self.progress(self.submission_progress, ref, ("COMPLETE", "0.85"))
                answer = {"ref": ref, "status": status}
                if status == "COMPLETE":
                    answer["publicScore"] = score
                elif status == "ERROR":
                    answer["errorDescription"] = score
                listed.append(answer)
            return 200, {"submissions": listed[::-1]}
        return self._answer_models(endpoint, body)

    def _answer_models(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        model = f"{body.get('ownerSlug')}/{body.get('modelSlug')}"
        if endpoint == "GetModel":
            if model not in self.models:
                return 404, {"code": 404, "message": f"Model {model} not found"}
            return 200, {"id": 1, "ownerSlug": body.get("ownerSlug"), "slug": body.get("modelSlug")}
        if endpoint == "CreateModel":
            model = f"{body.get('ownerSlug')}/{body.get('slug')}"
            self.models.add(model)
            return 200, {"id": len(self.models), "ref": model, "url": f"{self.url}/models/{model}"}
        if endpoint in ("CreateModelInstance", "CreateModelInstanceVersion"):
            inner = body.get("body", {})
            framework = body.get("framework") or inner.get("framework")
            instance = (
                f"{model}/{framework}/{body.get('instanceSlug') or inner.get('instanceSlug')}"
            )
            if model not in self.models:
                return 404, {"code": 404, "message": f"Model {model} not found"}
            if missing := self._missing_tokens(_tokens(inner)):
                return 400, {"code": 400, "message": f"unknown upload tokens {missing}"}
            if endpoint == "CreateModelInstance" and instance in self.model_instances:
                return 200, {"error": f"{instance} already exists", "errorCode": 409}
            self.model_instances[instance] = self.model_instances.get(instance, 0) + 1
            return 200, {"id": 1, "ref": instance, "url": f"{self.url}/models/{instance}"}
        if endpoint == "GetModelInstance":
            instance = f"{model}/{body.get('framework')}/{body.get('instanceSlug')}"
            if instance not in self.model_instances:
                return 404, {"code": 404, "message": f"Model instance {instance} not found"}
            version = self.model_instances[instance]
            return 200, {"slug": body.get("instanceSlug"), "versionNumber": version}
        return 404, {"code": 404, "message": f"fake_kaggle has no handler for {endpoint}"}

    def _missing_tokens(self, tokens: Any) -> list[str]:
        return [
            token for token in tokens if token not in self.uploads or not self.uploads[token].done
        ]


def _tokens(body: dict[str, Any]) -> list[str]:
    """Upload tokens of a request's files and (nested) directories."""
    tokens = [file["token"] for file in body.get("files", [])]
    for directory in body.get("directories", []):
        tokens += _tokens(directory)
    return tokens


def _kernel_answer(kernel: str, saved: dict[str, Any]) -> dict[str, Any]:
    """GetKernel's answer for a kernel pushed with SaveKernel `saved`."""
    names = ("language", "kernelType", "isPrivate", "enableGpu", "enableTpu", "enableInternet")
    metadata = {name: saved[name] for name in names if name in saved}
    for source in ("dataset", "competition", "kernel", "model"):
        metadata[f"{source}DataSources"] = saved.get(f"{source}DataSources", [])
    metadata.update(ref=kernel, title=saved.get("newTitle", ""), slug=kernel.split("/")[1])
    blob = {
        "source": saved.get("text", ""),
        "language": saved.get("language", "python"),
        "kernelType": saved.get("kernelType", "script"),
        "slug": kernel.split("/")[1],
    }
    return {"metadata": metadata, "blob": blob}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKaggle  # set on the subclass made in FakeKaggle.start

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _user(self) -> str | None:
        """The account the request authenticates as, or None (no or wrong credentials)."""
        scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
        if scheme == "Basic":
            username, _, key = base64.b64decode(value).decode().partition(":")
            return username if self.fake.credentials.get(username) == key else None
        if scheme == "Bearer":
            return self.fake.tokens.get(value)
        return None

    def _send(self, status: int, payload: dict[str, Any] | None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        raw = self._read_body()
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {"_raw": raw.decode(errors="replace")}
        endpoint = self.path.rstrip("/").rsplit("/", 1)[-1]
        fake = self.fake
        with fake._lock:
            user = self._user()
            fake.requests.append(Request("POST", self.path, endpoint, body, user))
            if failure := fake._failure(endpoint):
                self._send(failure.status, {"code": failure.status, "message": failure.message})
                return
            # IntrospectToken checks the token in its body; everything else needs credentials.
            if user is None and endpoint != "IntrospectToken":
                self._send(401, {"code": 401, "message": "Unauthenticated"})
                return
            if endpoint in fake.replies:
                self._send(200, fake.replies[endpoint])
                return
            status, payload = fake._answer(endpoint, body)
        self._send(status, payload)

    def do_PUT(self) -> None:
        data = self._read_body()
        token = self.path.rsplit("/", 1)[-1]
        fake = self.fake
        with fake._lock:
            upload = fake.uploads.get(token)
            name = upload.name if upload else token
            fake.requests.append(Request("PUT", self.path, UPLOAD, {"name": name}, None))
            if failure := fake._failure(UPLOAD):
                self._send(failure.status, {"code": failure.status, "message": failure.message})
                return
            if upload is None or not self.path.startswith("/upload/"):
                self._send(404, {"code": 404, "message": "no such upload"})
                return
            upload.data = data
            upload.done = True
        self._send(200, {})


def isolate_kaggle_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Clear every Kaggle credential source: HOME and KAGGLE_CONFIG_DIR move under tmp_path, no
    KAGGLE_* credentials in the environment. Returns the (empty) config dir."""
    home = tmp_path / "home"
    config_dir = tmp_path / "kaggle-config"
    home.mkdir(exist_ok=True)
    config_dir.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config_dir))
    for name in (
        "KAGGLE_USERNAME",
        "KAGGLE_KEY",
        "KAGGLE_API_TOKEN",
        "KAGGLE_KERNEL_RUN_TYPE",
        "KAGGLE_COMPETITION_SUBMISSION_MODEL_VERSION_ID",
        "XDG_CONFIG_HOME",
    ):
        monkeypatch.delenv(name, raising=False)
    return config_dir


def use_fake_kaggle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake: FakeKaggle) -> None:
    """Point the official client at `fake`, with the fake's credentials in the environment."""
    from kagglesdk import kaggle_env

    isolate_kaggle_env(monkeypatch, tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", USERNAME)
    monkeypatch.setenv("KAGGLE_KEY", fake.credentials[USERNAME])
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    for env in kaggle_env.KaggleEnv:
        monkeypatch.setitem(kaggle_env._env_to_endpoint, env, fake.url)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # Archives of zipped folders and the client's resumable-upload notes go to the temp dir.
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))


@pytest.fixture
def fake_kaggle(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeKaggle]:
    """A running FakeKaggle that the official client talks to, as user `kseg-tester`."""
    fake = FakeKaggle().start()
    use_fake_kaggle(monkeypatch, tmp_path, fake)
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def no_kaggle_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Kaggle credentials anywhere (see isolate_kaggle_env); returns the empty config dir."""
    return isolate_kaggle_env(monkeypatch, tmp_path)
