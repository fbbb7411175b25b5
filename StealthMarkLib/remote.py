"""Verify a model you can only query: an HTTP endpoint, or a vendor's command-line tool.

Both appear to verification as a :class:`RemoteModel`, a :class:`~StealthMarkLib.models.SegmentationModel`
whose module sends each batch out of this process and checks the answer like any model's (shape, NaN,
probabilities summing to 1). ``stealthmark serve`` is the matching reference server.

Wire protocol ``stealthmark-remote/1`` (``URL`` is the base address, e.g. ``http://127.0.0.1:8080``):

``GET URL/info`` -> 200, ``application/json``::

    {"protocol": "stealthmark-remote/1", "image_size": [H, W], "in_channels": C, "num_classes": K,
     "outputs": "probabilities", "max_batch": 64, "device": "cuda:0 (NVIDIA H100, 79.1 GiB)"}

``image_size`` may be null (the client then needs ``--image-size``); ``outputs`` is ``"probabilities"`` or
``"logits"`` (softmax, or sigmoid for one channel, is then applied by the client); ``max_batch``,
``device``, ``intensity`` and ``spatial_dims`` are optional.

3-D models (a compatible extension of the same protocol): the info says ``"spatial_dims": 3`` and
``"image_size": [D, H, W]`` (the ROI; null: the client needs ``--spec``), and every array gets the extra
axis: (B, C, D, H, W) in, (B, K, D, H, W) out. Without ``spatial_dims`` (or with 2) everything is 2-D as
before; a client that predates the field refuses a 3-D server's three-number ``image_size`` with a message.

``POST URL/predict`` with ``Content-Type: application/x-npy`` and one ``.npy`` file as the body: float32,
shape (B, C, H, W), model input space -> 200, ``application/x-npy``: float32 (B, K, H, W) (one channel = the
foreground of a binary model).

Errors: a 4xx/5xx status with ``application/json`` ``{"error": "one sentence"}``. The reference server
answers 413 to bodies over its size limit or more than ``max_batch`` images, 415 to another content
type, 400 to an array of another dtype or shape, 500 when the model fails.

``.npy`` data is only ever read with ``np.load(allow_pickle=False)``, after its header has been checked
against the byte count: no pickles, no object arrays, no allocation the data does not back.

``--command TEMPLATE`` runs a vendor tool once per batch: the template is split like a shell line
(:func:`shlex.split`), ``{input}`` and ``{output}`` are replaced in each argument by ``.npy`` paths in a
private temporary folder (mode 0700), and the program runs WITHOUT a shell (no pipes, globs or variables:
write ``sh -c '...'`` yourself if the tool needs them). It reads (B, C, H, W) from ``{input}`` and writes
(B, K, H, W) to ``{output}``, like ``/predict`` (a 3-D tool, described by ``--spec``: (B, C, D, H, W) and
(B, K, D, H, W)).
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__
from .errors import InputError, ModelError, StealthMarkError
from .models import ModelSpec, SegmentationModel, load_model
from .progress import Progress

PROTOCOL = "stealthmark-remote/1"
NPY_TYPE = "application/x-npy"
OUTPUTS = ("probabilities", "logits")
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_BODY_MB = 256
INFO_LIMIT = 64 * 1024
NPY_MAGIC = b"\x93NUMPY"


# -- .npy in and out -----------------------------------------------------------------------------------
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def read_npy(data: bytes, what: str) -> np.ndarray:
    """One .npy array from bytes; :class:`ModelError` naming ``what`` for anything else."""
    if not data.startswith(NPY_MAGIC):
        raise ModelError(f"{what} is not a .npy array (it starts with {data[:16]!r}); the protocol wants one "
                         "float32 array in NumPy's .npy format")
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise ModelError(f"{what} has a broken .npy header: {exc}") from None
    if dtype.hasobject:
        raise ModelError(f"{what} holds Python objects (dtype {dtype}); only numeric arrays are accepted")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - buf.tell() != expected:
        raise ModelError(f"{what} claims shape {tuple(shape)} {dtype} ({expected} bytes) but carries "
                         f"{len(data) - buf.tell()} bytes of data")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ModelError(f"{what} cannot be read as .npy: {exc}") from None
    return arr


def _expected(b: int, spatial: tuple[int, ...]) -> str:
    return f"({b}, K, {', '.join(map(str, spatial))})"


def check_answer(arr: np.ndarray, in_shape: tuple[int, ...], what: str) -> torch.Tensor:
    """A (B, K, H, W) (or, for volumes in, (B, K, D, H, W)) float answer to an input of ``in_shape``, as a
    float32 tensor; else :class:`ModelError`."""
    b, spatial = int(in_shape[0]), tuple(int(s) for s in in_shape[2:])
    if arr.dtype.kind != "f":
        raise ModelError(f"{what} has dtype {arr.dtype}; expected float32 probabilities {_expected(b, spatial)}")
    if arr.ndim != len(in_shape) or arr.shape[0] != b or arr.shape[2:] != spatial or arr.shape[1] < 1:
        raise ModelError(f"{what} has shape {arr.shape} for input shape {tuple(in_shape)}; "
                         f"expected {_expected(b, spatial)}")
    if not np.isfinite(arr).all():
        raise ModelError(f"{what} holds NaN or infinite values (input shape {tuple(in_shape)})")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _tail(data: bytes | str, limit: int = 600) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


# -- the query object ----------------------------------------------------------------------------------
class _Transport(torch.nn.Module):
    """A parameter-free module whose forward asks something outside this process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return self.ask(arr)

    def ask(self, arr: np.ndarray) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class RemoteModel(SegmentationModel):
    """A model behind an endpoint or a command, queried like a local one (on the CPU side, no weights)."""

    def __init__(self, transport: _Transport, spec: ModelSpec, max_batch: int, logits: bool, source: str,
                 device_description: str) -> None:
        # there are no weights to hash: model_sha256 stays None and the report's "model" names the source
        super().__init__(transport, spec, device="cpu", max_batch=max_batch, logits=logits, source=source)
        self._description = device_description

    @property
    def device_description(self) -> str:
        return self._description


def _public_url(url: str) -> str:
    """The URL without user:password or query (they may hold credentials), for reports and messages."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpTransport(_Transport):
    """Speaks ``stealthmark-remote/1`` to ``url``."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, retries: int = 0) -> None:
        super().__init__()
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise InputError(f"--endpoint {url!r} is not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"--endpoint must be an http:// or https:// URL with a host, not {url!r}")
        if not timeout or timeout <= 0:
            raise InputError(f"--timeout must be a positive number of seconds, not {timeout!r}")
        if retries < 0:
            raise InputError(f"--retries must be 0 or more, not {retries}")
        self.base = url.rstrip("/")
        self.display = _public_url(url)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.num_classes = 2
        # proxies from the environment are honoured, except for this machine's own addresses
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def _request(self, method: str, path: str, limit: int, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> bytes:
        where = f"{self.display}{path}"
        for attempt in range(self.retries + 1):
            retry = True
            try:
                req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
                with self._opener.open(req, timeout=self.timeout) as resp:
                    data = resp.read(limit + 1)
                if len(data) > limit:
                    raise ModelError(f"the endpoint's answer from {where} is larger than {limit} bytes, more than "
                                     "the request can need; is this a StealthMark endpoint?")
                return data
            except urllib.error.HTTPError as exc:
                err = ModelError(f"the endpoint {where} answered HTTP {exc.code} {exc.reason}{_error_detail(exc)}")
                retry = exc.code >= 500 or exc.code == 429
            except (TimeoutError, socket.timeout):
                err = ModelError(f"the endpoint {where} did not answer within {self.timeout:g} s; check the "
                                 "server or raise --timeout")
            except urllib.error.URLError as exc:
                err = ModelError(f"cannot reach the endpoint {where}: {_reason(exc.reason, self.timeout)}")
            except (http.client.HTTPException, ConnectionError, OSError) as exc:
                err = ModelError(f"the connection to the endpoint {where} broke: {type(exc).__name__}: {exc}")
            if not retry or attempt == self.retries:
                raise err
            time.sleep(min(0.5 * 2 ** attempt, 5.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def info(self) -> dict[str, Any]:
        data = self._request("GET", "/info", INFO_LIMIT, headers={"Accept": "application/json"})
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelError(f"{self.display}/info did not answer JSON (it starts with {data[:40]!r}); is this a "
                             f"StealthMark ({PROTOCOL}) endpoint?") from None
        return parse_info(doc, f"{self.display}/info")

    def ask(self, arr: np.ndarray) -> torch.Tensor:
        limit = arr.shape[0] * max(self.num_classes, 1) * int(np.prod(arr.shape[2:])) * 8 + 65536
        data = self._request("POST", "/predict", limit, body=npy_bytes(arr),
                             headers={"Content-Type": NPY_TYPE, "Accept": NPY_TYPE})
        return check_answer(read_npy(data, "the endpoint's answer"), arr.shape, "the endpoint's answer")


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read(4096)
    except Exception:  # a broken error body must not hide the status
        return ""
    try:
        msg = json.loads(body.decode("utf-8")).get("error")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        msg = _tail(body, 200) if body else None
    return f": {msg}" if msg else ""


def _reason(reason: Any, timeout: float) -> str:
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s; check the server or raise --timeout"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused; is the server running, and are the host and port right?"
    if isinstance(reason, socket.gaierror):
        return f"unknown host ({reason.strerror})"
    return str(reason)


def parse_info(doc: Any, where: str) -> dict[str, Any]:
    """Check an info document; a :class:`ModelError` naming the first bad field."""
    if not isinstance(doc, dict):
        raise ModelError(f"{where} must be a JSON object, not {type(doc).__name__}")

    def bad(field: str, want: str) -> ModelError:
        return ModelError(f"{where}: {field} must be {want}, not {doc.get(field)!r} (protocol {PROTOCOL})")

    def pos_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    dims = doc.get("spatial_dims", 2)
    if dims not in (2, 3) or isinstance(dims, bool):
        raise bad("spatial_dims", "2 (images) or 3 (volumes)")
    size = doc.get("image_size")
    if size is not None and not (isinstance(size, list) and len(size) == dims and all(pos_int(s) for s in size)):
        raise bad("image_size", "[H, W] or null" if dims == 2 else "the ROI [D, H, W] or null (spatial_dims 3)")
    if not pos_int(doc.get("in_channels")):
        raise bad("in_channels", "a positive integer")
    if not pos_int(doc.get("num_classes")) or doc["num_classes"] < 2:
        raise bad("num_classes", "an integer >= 2")
    if doc.get("outputs", "probabilities") not in OUTPUTS:
        raise bad("outputs", " or ".join(OUTPUTS))
    if "max_batch" in doc and not pos_int(doc["max_batch"]):
        raise bad("max_batch", "a positive integer")
    if doc.get("intensity") is not None and not isinstance(doc["intensity"], dict):
        raise bad("intensity", "an object or null")
    return doc


def _read_spec(spec: ModelSpec | str | Path | None) -> ModelSpec | None:
    from .models import read_spec

    if spec is None or isinstance(spec, ModelSpec):
        return None if spec is None else spec.check()
    return read_spec(spec)


def open_endpoint(url: str, *, timeout: float = DEFAULT_TIMEOUT, retries: int = 0, max_batch: int = 64,
                  logits: bool = False, image_size: tuple[int, int] | None = None,
                  spec: ModelSpec | str | Path | None = None) -> RemoteModel:
    """Ask ``URL/info`` and return the endpoint as a query object.

    ``spec`` (a ModelSpec or a JSON spec file) fills in what the info leaves null (a 3-D model's ROI,
    ``intensity``); where both say something they must agree.
    """
    given = _read_spec(spec)
    transport = HttpTransport(url, timeout, retries)
    info = transport.info()
    transport.num_classes = info["num_classes"]
    dims = int(info.get("spatial_dims", 2))
    size = info.get("image_size")
    where = f"{transport.display}/info"
    if given is not None:
        theirs = {"spatial_dims": dims, "in_channels": info["in_channels"], "num_classes": info["num_classes"],
                  "image_size": size}
        for field_name, value in theirs.items():
            mine = getattr(given, field_name)
            if value is not None and mine is not None and list(np.atleast_1d(mine)) != list(np.atleast_1d(value)):
                raise InputError(f"--spec says {field_name} {mine!r} but {where} says {value!r}")
        size = size or given.image_size
    if image_size:
        if dims == 3:
            raise InputError(f"--image-size is for 2-D models: {where} says spatial_dims 3; give a 3-D endpoint's "
                             "ROI with --spec SPEC.json (image_size [D, H, W]) if its info does not say it")
        size = list(image_size)
    if dims == 3 and not size:
        raise InputError(f"{where} says spatial_dims 3 but not the ROI (image_size null): pass --spec SPEC.json "
                         "with spatial_dims 3 and image_size [D, H, W]")
    spec = ModelSpec(network=None, args={}, head="probabilities", in_channels=info["in_channels"],
                     num_classes=info["num_classes"], image_size=list(size) if size else None,
                     intensity=info.get("intensity") or (given.intensity if given else None), spatial_dims=dims)
    batch = min(int(max_batch), info.get("max_batch", max_batch))
    server = info.get("device") or "not stated"
    return RemoteModel(transport, spec, batch, logits or info.get("outputs") == "logits", transport.display,
                       f"remote endpoint {transport.display} (server device: {server})")


# -- a vendor's command --------------------------------------------------------------------------------
class CommandTransport(_Transport):
    """Runs a command template per batch: ``{input}`` -> (B, C, H, W) .npy, ``{output}`` <- (B, K, H, W)."""

    def __init__(self, template: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__()
        for placeholder in ("{input}", "{output}"):
            if placeholder not in template:
                raise InputError(f"--command needs the placeholder {placeholder} (the .npy file the tool "
                                 f"{'reads' if placeholder == '{input}' else 'writes'}): {template!r}")
        try:
            self.argv = shlex.split(template)
        except ValueError as exc:
            raise InputError(f"--command cannot be split into arguments ({exc}): {template!r}") from None
        if shutil.which(self.argv[0]) is None:
            raise InputError(f"--command: the program {self.argv[0]!r} was not found (not on PATH, or not an "
                             "executable file)")
        if not timeout or timeout <= 0:
            raise InputError(f"--timeout must be a positive number of seconds, not {timeout!r}")
        self.template = template
        self.timeout = float(timeout)
        self.num_classes = 2

    def ask(self, arr: np.ndarray) -> torch.Tensor:
        b, spatial = arr.shape[0], tuple(arr.shape[2:])
        with tempfile.TemporaryDirectory(prefix="stealthmark-cmd-") as tmp:  # mode 0700
            src, dst = Path(tmp) / "input.npy", Path(tmp) / "output.npy"
            src.write_bytes(npy_bytes(arr))
            argv = [a.replace("{input}", str(src)).replace("{output}", str(dst)) for a in self.argv]
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise ModelError(f"the command did not finish within {self.timeout:g} s (stopped); raise "
                                 "--timeout or check the tool") from None
            except OSError as exc:
                raise ModelError(f"the command could not be started: {exc}") from None
            tail = _tail(proc.stderr) or _tail(proc.stdout)
            said = f"; its output ends: {tail}" if tail else "; it printed nothing"
            if proc.returncode != 0:
                raise ModelError(f"the command exited with status {proc.returncode}{said}")
            if not dst.is_file():
                raise ModelError(f"the command exited 0 but wrote no output file ({{output}}){said}")
            if dst.stat().st_size > b * max(self.num_classes, 1) * int(np.prod(spatial)) * 8 + 65536:
                raise ModelError(f"the command's output is far larger than {_expected(b, spatial)} float32{said}")
            data = dst.read_bytes()
        try:
            return check_answer(read_npy(data, "the command's output"), arr.shape, "the command's output")
        except ModelError as exc:
            raise ModelError(f"{exc}{said}") from None


def open_command(template: str, image_size: tuple[int, int] | None, *, in_channels: int | None = None,
                 num_classes: int | None = None, timeout: float = DEFAULT_TIMEOUT, max_batch: int = 64,
                 logits: bool = False, spec: ModelSpec | str | Path | None = None) -> RemoteModel:
    """A vendor tool as a query object; without ``num_classes`` one probe call (a blank image) finds K.

    ``spec`` (a ModelSpec or JSON spec file) describes the tool instead of ``image_size``/``in_channels``/
    ``num_classes``: the way to give a 3-D tool (``spatial_dims`` 3, ``image_size`` its ROI [D, H, W]).
    """
    given = _read_spec(spec)
    dims, intensity = 2, None
    if given is not None:
        if image_size is not None:
            raise InputError("give the tool's input size once: --spec's image_size, or --image-size, not both")
        for flag, mine, theirs in (("--in-channels", in_channels, given.in_channels),
                                   ("--num-classes", num_classes, given.num_classes)):
            if mine is not None and mine != theirs:
                raise InputError(f"{flag} {mine} contradicts --spec's {theirs}")
        if not given.image_size:
            shape = "[H, W]" if given.spatial_dims == 2 else "the ROI [D, H, W] (spatial_dims 3)"
            raise InputError(f"--command with --spec needs the spec's image_size, {shape}: a command cannot say "
                             "what input size it takes")
        image_size, in_channels, dims, intensity = given.image_size, given.in_channels, given.spatial_dims, \
            given.intensity
        num_classes = num_classes if num_classes is not None else given.num_classes
    if image_size is None:
        raise InputError("--command needs --image-size H W (a 2-D tool), or --spec SPEC.json with spatial_dims 3 "
                         "and image_size [D, H, W] (a 3-D tool): a command cannot say what input size it takes")
    c = 1 if in_channels is None else int(in_channels)
    if c < 1:
        raise InputError(f"--in-channels must be at least 1, not {c}")
    if num_classes is not None and num_classes < 2:
        raise InputError(f"--num-classes must be at least 2, not {num_classes}")
    transport = CommandTransport(template, timeout)
    if num_classes is None:
        transport.num_classes = 256  # the size limit of the answer, before K is known
        probe = transport.ask(np.zeros((1, c, *image_size), dtype=np.float32))
        num_classes = max(2, int(probe.shape[1]))
    transport.num_classes = num_classes
    spec = ModelSpec(network=None, args={}, head="probabilities", in_channels=c, num_classes=int(num_classes),
                     image_size=list(image_size), intensity=intensity, spatial_dims=dims)
    return RemoteModel(transport, spec, int(max_batch), logits, f"command: {template}",
                       "external command (device not known)")


# -- the reference server ------------------------------------------------------------------------------
class _App:
    def __init__(self, model: SegmentationModel, image_size: tuple[int, ...], max_batch: int, max_body: int):
        self.model = model
        self.size = tuple(int(s) for s in image_size)   # (H, W), or a 3-D model's ROI (D, H, W)
        self.max_batch = max_batch
        self.max_body = max_body
        self.lock = threading.Lock()
        self.served = 0
        self.info = {"protocol": PROTOCOL, "image_size": list(image_size), "in_channels": model.in_channels,
                     "num_classes": model.num_classes, "outputs": "probabilities", "max_batch": max_batch,
                     "device": model.device_description, "intensity": model.spec.intensity,
                     "spatial_dims": model.spatial_dims, "server": f"stealthmark {__version__}"}


class _Handler(BaseHTTPRequestHandler):
    server_version = f"StealthMark/{__version__}"
    timeout = 60  # a client that stops sending mid-body does not hold a thread for ever

    @property
    def app(self) -> _App:
        return self.server.app  # type: ignore[attr-defined]

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str) -> None:
        self._send(code, json.dumps({"error": message}).encode("utf-8"), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        if path == "/info":
            return self._send(200, json.dumps(self.app.info).encode("utf-8"), "application/json")
        self._error(404, f"no such resource {path or '/'}; use GET /info or POST /predict")

    def do_POST(self) -> None:  # noqa: N802
        app = self.app
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        if path != "/predict":
            return self._error(404, f"no such resource {path or '/'}; use POST /predict")
        if self.headers.get_content_type() != NPY_TYPE:
            return self._error(415, f"send the images as Content-Type {NPY_TYPE}, not "
                                    f"{self.headers.get_content_type()}")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "a Content-Length header is required")
        if length > app.max_body:
            self.close_connection = True
            if length <= 4 * app.max_body:  # read it, so that the client sees this answer, not a reset
                for _ in range(0, length, 1 << 20):
                    self.rfile.read(min(1 << 20, length))
            return self._error(413, f"the body has {length} bytes, over this server's limit of {app.max_body}; "
                                    "send fewer images per request")
        body = self.rfile.read(length)
        if len(body) != length:
            return self._error(400, f"the body ended after {len(body)} of {length} bytes")
        try:
            arr = read_npy(body, "the body")
        except ModelError as exc:
            return self._error(400, str(exc))
        want = (app.model.in_channels, *app.size)
        if arr.dtype != np.float32:
            return self._error(400, f"the images have dtype {arr.dtype}; send float32")
        if arr.ndim != 1 + len(want) or arr.shape[1:] != want or arr.shape[0] < 1:
            what = "images" if len(app.size) == 2 else "volumes of a 3-D model"
            return self._error(400, f"the {what} have shape {arr.shape}; send (B, {', '.join(map(str, want))}) "
                                    "with B >= 1")
        if arr.shape[0] > app.max_batch:
            return self._error(413, f"{arr.shape[0]} images in one request, over this server's max_batch "
                                    f"{app.max_batch}")
        try:
            with app.lock:
                probs = app.model.probabilities(arr).detach().cpu().numpy().astype(np.float32)
                app.served += 1
        except StealthMarkError as exc:
            return self._error(500, f"the model failed: {exc}")
        except Exception as exc:  # never let one request take the server down
            traceback.print_exc(file=sys.stderr)
            return self._error(500, f"the model failed: {type(exc).__name__}: {exc}")
        self._send(200, npy_bytes(probs), NPY_TYPE)


def make_server(model: SegmentationModel, host: str = "127.0.0.1", port: int = 8080,
                image_size: tuple[int, ...] | None = None, max_batch: int = 64,
                max_body_mb: float = DEFAULT_MAX_BODY_MB, quiet: bool = False) -> ThreadingHTTPServer:
    """A (not yet started) server answering ``stealthmark-remote/1`` for ``model``; ``port`` 0 picks one.

    A 3-D model (spec ``spatial_dims`` 3) is served on its ROI [D, H, W]: (B, C, D, H, W) volumes in."""
    if model.spatial_dims == 3:
        if image_size:
            raise InputError("--image-size is for 2-D models: a 3-D model's spec records its ROI [D, H, W]")
        size = tuple(model.spec.image_size or ())
        if len(size) != 3:
            raise InputError("the 3-D model does not record its ROI: its spec needs image_size [D, H, W]")
    else:
        size = tuple(image_size) if image_size else tuple(model.spec.image_size or ())
        if len(size) != 2:
            raise InputError("the model does not record its input size: pass --image-size H W")
    if max_batch < 1 or max_body_mb <= 0:
        raise InputError("--max-batch and --max-body-mb must be positive")
    if not model.spec_known:  # a TorchScript file without a spec: one blank image tells K
        model.probabilities(np.zeros((1, model.in_channels, *size), dtype=np.float32))
        model.spec_known = True
    handler = type("_QuietHandler", (_Handler,), {"log_message": lambda *a: None}) if quiet else _Handler
    server_cls = ThreadingHTTPServer
    if ":" in host:  # an IPv6 address such as ::1
        server_cls = type("_ServerV6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    try:
        server = server_cls((host, int(port)), handler)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --host or "
                         "--port") from None
    server.daemon_threads = True
    server.app = _App(model, size, int(max_batch), int(max_body_mb * 2**20))  # type: ignore[attr-defined]
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    host = str(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_serve(model_path: str | Path, *, spec: str | Path | None = None, host: str = "127.0.0.1",
              port: int = 8080, device: str = "auto", logits: bool = False,
              image_size: tuple[int, int] | None = None, max_batch: int = 64,
              max_body_mb: float = DEFAULT_MAX_BODY_MB, progress: Progress | None = None,
              announce: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Serve a model until ``progress`` is cancelled (Ctrl-C, SIGTERM); returns what was served."""
    progress = progress or Progress()
    model = load_model(model_path, spec=spec, device=device, logits=logits, max_batch=max_batch)
    server = make_server(model, host, port, image_size, max_batch, max_body_mb)
    url = server_url(server)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        info = dict(server.app.info, url=url)  # type: ignore[attr-defined]
        if announce is not None:
            warn = "" if _is_loopback(host) else " (reachable from other machines: the server has no authentication)"
            announce(f"serving {model_path} at {url}{warn}; device {model.device_description}; "
                     "Ctrl-C or SIGTERM stops", info)
        while not progress.cancelled:
            time.sleep(0.2)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    return {"url": url, "model": str(model_path), "predict_requests": server.app.served}  # type: ignore
