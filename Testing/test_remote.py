"""Verifying a model you can only query, on loopback only: ``stealthmark serve`` and ``verify --endpoint``
(the stealthmark-remote/1 protocol), ``verify --command`` with a real tool script, and every bad answer.

A real tiny MONAI UNet (64 px) saved as TorchScript is served by the reference server; verification through
the endpoint and through a command must give the same report numbers as local verification of the same
model and key (same seed): that shows the remote path queries exactly the same model."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from StealthMarkLib import remote
from StealthMarkLib.cli import main
from StealthMarkLib.errors import InputError, ModelError
from StealthMarkLib.key import create_key
from StealthMarkLib.models import SegmentationModel, build_network, load_model, save_model
from StealthMarkLib.train import demo_spec

warnings.filterwarnings("ignore", category=DeprecationWarning)
ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
SAMPLES = 64          # one LIME batch of 64 per trigger image
COMPARED = ("verdict", "payload_decoded", "payload_match", "data_module_agreement", "bit_errors",
            "n_data_modules", "p_value", "n_queries", "observed_modules")

TOOL = r'''
import sys, time
import numpy as np
mode = sys.argv[4]
if mode == "fail":
    print("loading weights...\nvendor licence expired", file=sys.stderr)
    sys.exit(3)
if mode == "nooutput":
    sys.exit(0)
if mode == "sleep":
    time.sleep(30)
x = np.load(sys.argv[2], allow_pickle=False)
if mode == "shape":
    np.save(sys.argv[3], np.full((x.shape[0], 2, 10, 10), 0.5, np.float32))
    sys.exit(0)
import torch
torch.set_num_threads(1)
m = torch.jit.load(sys.argv[1]).eval()
with torch.no_grad():
    y = m(torch.from_numpy(x)).numpy().astype(np.float32)
np.save(sys.argv[3], y)
'''


def cli(*args) -> int:
    return main([*map(str, args), "--progress", "none"])


def _serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


class Vendor(BaseHTTPRequestHandler):
    """A badly behaved endpoint: the first path segment picks the misbehaviour (a real HTTP server)."""

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/x-npy") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        mode = self.path.strip("/").split("/")[0]
        if mode == "badinfo":
            return self._send(200, b"<html>hello</html>", "text/html")
        if mode == "noinfo":
            return self._send(404, b'{"error": "no"}', "application/json")
        info = {"protocol": remote.PROTOCOL, "image_size": [SIZE, SIZE], "in_channels": 1, "num_classes": 2,
                "outputs": "probabilities"}
        if mode == "badclasses":
            info["num_classes"] = 1
        self._send(200, json.dumps(info).encode(), "application/json")

    def do_POST(self) -> None:  # noqa: N802
        mode = self.path.strip("/").split("/")[0]
        x = np.load(io.BytesIO(self.rfile.read(int(self.headers["Content-Length"]))), allow_pickle=False)
        p = np.full((x.shape[0], 2, SIZE, SIZE), 0.5, np.float32)
        if mode == "sleep":
            time.sleep(3)
        elif mode == "garbage":
            return self._send(200, b"\x00\x01garbage, not an array" * 10)
        elif mode == "shape":
            p = p[:, :, : SIZE // 2]
        elif mode == "http500":
            return self._send(500, b'{"error": "vendor GPU on fire"}', "application/json")
        elif mode == "unnormalised":
            p = p * 1.5
        elif mode == "nan":
            p[0, 1, 3, 3] = np.nan
        elif mode == "truncated":
            return self._send(200, remote.npy_bytes(p)[:-100])
        elif mode == "pickle":
            buf = io.BytesIO()
            np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
            return self._send(200, buf.getvalue())
        elif mode == "ints":
            p = (p * 2).astype(np.int32)
        self._send(200, remote.npy_bytes(p))


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("remote")
    spec = demo_spec((4, 8), SIZE)
    path = save_model(SegmentationModel(build_network(spec), spec, device="cpu"), tmp / "tiny.ts", spec)
    key_path = create_key("SM:REMOTE-0001", seed=4242, samples=SAMPLES).save(tmp / "key.json")
    good = remote.make_server(load_model(path, device="cpu"), port=0, quiet=True)
    strict = remote.make_server(load_model(path, device="cpu"), port=0, quiet=True, max_batch=1, max_body_mb=0.04)
    vendor = ThreadingHTTPServer(("127.0.0.1", 0), Vendor)
    for s in (good, strict, vendor):
        _serve_in_thread(s)
    tool = tmp / "tool.py"
    tool.write_text(TOOL)
    yield {"tmp": tmp, "model": path, "key": key_path, "url": remote.server_url(good),
           "strict": remote.server_url(strict), "vendor": remote.server_url(vendor), "tool": tool}
    for s in (good, strict, vendor):
        s.shutdown()
        s.server_close()


def template(world, mode: str = "ok") -> str:
    return " ".join(shlex.quote(str(a)) for a in (sys.executable, world["tool"], world["model"])) + \
        f" {{input}} {{output}} {mode}"


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


# -- equivalence -----------------------------------------------------------------------------------
def test_endpoint_probabilities_equal_local_ones(world):
    local = load_model(world["model"], device="cpu")
    rem = remote.open_endpoint(world["url"], timeout=30)
    assert (rem.in_channels, rem.num_classes, rem.spec.image_size) == (1, 2, [SIZE, SIZE])
    assert rem.sha256 is None and rem.source == world["url"]
    assert "remote endpoint" in rem.device_description and "cpu" in rem.device_description
    x = torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    got, want = rem.probabilities(x), local.probabilities(x)
    assert got.shape == (5, 2, SIZE, SIZE)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.equal(got[0], got[1])  # real, input-dependent answers


def test_verify_endpoint_and_command_match_local_verification(world, capsys):
    tmp, common = world["tmp"], ("--key", world["key"], "--samples", SAMPLES, "--seed", 11)
    assert cli("verify", "--model", world["model"], "--out", tmp / "local", "--device", "cpu", *common) == 0
    assert cli("verify", "--endpoint", world["url"], "--out", tmp / "http", *common) == 0
    assert cli("verify", "--command", template(world), "--image-size", SIZE, SIZE, "--out", tmp / "cmd",
               *common) == 0
    local, http, cmd = report(tmp / "local"), report(tmp / "http"), report(tmp / "cmd")
    assert local["n_queries"] == SAMPLES and local["model_sha256"]
    for r in (http, cmd):
        assert {k: r[k] for k in COMPARED} == {k: local[k] for k in COMPARED}
        np.testing.assert_allclose(r["attribution"], local["attribution"], atol=1e-4)
        assert r["model_sha256"] is None  # a remote model's weights cannot be hashed
        assert (tmp / "http" / "report.html").is_file()
    assert np.std(local["attribution"]) > 0
    assert http["model"] == world["url"] and "remote endpoint" in http["device"]
    assert cmd["model"].startswith("command: ") and "external command" in cmd["device"]


# -- bad endpoints: one clear message each, nothing written ------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode, timeout, needle", [
    ("closed", 5, "connection refused"),
    ("sleep", 0.5, "did not answer within 0.5 s"),
    ("garbage", 5, "not a .npy array"),
    ("shape", 5, "has shape (64, 2, 32, 64)"),
    ("http500", 5, "HTTP 500 Internal Server Error: vendor GPU on fire"),
    ("unnormalised", 5, "do not look like probabilities"),
    ("nan", 5, "NaN or infinite"),
    ("truncated", 5, "carries"),
    ("pickle", 5, "holds Python objects"),
    ("ints", 5, "dtype int32"),
    ("badinfo", 5, "did not answer JSON"),
    ("noinfo", 5, "HTTP 404"),
    ("badclasses", 5, "num_classes must be an integer >= 2"),
])
def test_bad_endpoint_gives_one_clear_error_and_writes_nothing(world, capsys, mode, timeout, needle):
    url = f"http://127.0.0.1:{_closed_port()}" if mode == "closed" else f"{world['vendor']}/{mode}"
    out = world["tmp"] / f"bad_{mode}"
    rc = cli("verify", "--endpoint", url, "--key", world["key"], "--out", out, "--samples", SAMPLES,
             "--timeout", timeout)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and err.count("stealthmark: error:") == 1, err
    assert "Traceback" not in err
    assert nothing_written(out)


def test_retries_then_the_same_clear_error(world):
    rem = remote.open_endpoint(f"{world['vendor']}/http500", retries=1)
    t0 = time.monotonic()
    with pytest.raises(ModelError, match="HTTP 500"):
        rem.probabilities(np.zeros((1, 1, SIZE, SIZE), np.float32))
    assert time.monotonic() - t0 >= 0.4  # it waited and asked again


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "127.0.0.1:8080", "http://127.0.0.1:99999"])
def test_bad_endpoint_url(url):
    with pytest.raises(InputError, match="--endpoint"):
        remote.open_endpoint(url)


# -- the reference server refuses bad requests with 4xx and a JSON error -------------------------------
def _post(url: str, body: bytes, ctype: str = remote.NPY_TYPE) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/predict", data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_server_refuses_bad_requests(world):
    url, img = world["strict"], np.zeros((1, 1, SIZE, SIZE), np.float32)
    with urllib.request.urlopen(url + "/info", timeout=10) as resp:
        info = json.loads(resp.read())
    assert info["protocol"] == remote.PROTOCOL and info["max_batch"] == 1 and info["image_size"] == [SIZE, SIZE]
    with urllib.request.urlopen(urllib.request.Request(url + "/predict", data=remote.npy_bytes(img),
                                                       headers={"Content-Type": remote.NPY_TYPE}),
                                timeout=10) as resp:
        probs = remote.read_npy(resp.read(), "answer")
    assert probs.shape == (1, 2, SIZE, SIZE) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    cases = [
        (remote.npy_bytes(np.zeros((3, 1, SIZE, SIZE), np.float32)), remote.NPY_TYPE, 413, "over this server's limit"),
        (remote.npy_bytes(np.zeros((2, 1, SIZE, SIZE), np.float32)), remote.NPY_TYPE, 413, "max_batch 1"),
        (remote.npy_bytes(img.astype(np.float64)), remote.NPY_TYPE, 400, "dtype float64"),
        (remote.npy_bytes(np.zeros((1, 1, 32, 32), np.float32)), remote.NPY_TYPE, 400, "shape (1, 1, 32, 32)"),
        (remote.npy_bytes(np.zeros((1, 2, SIZE, SIZE), np.float32)), remote.NPY_TYPE, 400, "send (B, 1, 64, 64)"),
        (b"not numpy at all", remote.NPY_TYPE, 400, "not a .npy array"),
        (remote.npy_bytes(img)[:-10], remote.NPY_TYPE, 400, "carries"),
        (remote.npy_bytes(img), "application/json", 415, "application/x-npy"),
    ]
    for body, ctype, code, needle in cases:
        got, doc = _post(url, body, ctype)
        assert got == code and needle in doc["error"], (code, needle, got, doc)
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(url + "/elsewhere", timeout=10)
    assert exc.value.code == 404 and "GET /info" in json.loads(exc.value.read())["error"]


@contextlib.contextmanager
def served(model_path):
    """``stealthmark serve --model model_path`` in a subprocess: yields the endpoint opened on the URL it
    prints and a dict that gets the server's exit code and output after SIGTERM when the block ends."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "StealthMarkLib.cli", "serve", "--model", str(model_path),
                             "--port", "0", "--device", "cpu", "--progress", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ended: dict = {}
    try:
        line = proc.stdout.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
        yield remote.open_endpoint(found.group(1), timeout=30), ended
        proc.send_signal(signal.SIGTERM)
        ended["out"], _ = proc.communicate(timeout=30)
        ended["returncode"] = proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_command_prints_url_and_stops_on_sigterm(world):
    with served(world["model"]) as (rem, ended):
        assert rem.probabilities(np.zeros((2, 1, SIZE, SIZE), np.float32)).shape == (2, 2, SIZE, SIZE)
    assert ended["returncode"] == 0 and "stopped serving" in ended["out"] and "1 prediction request" in ended["out"]


def test_serve_refuses_a_busy_port(world, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc = cli("serve", "--model", world["model"], "--port", s.getsockname()[1], "--device", "cpu")
    assert rc == 2 and "cannot listen on 127.0.0.1" in capsys.readouterr().err


# -- --command ---------------------------------------------------------------------------------------
def test_command_probe_finds_classes_and_answers_like_the_model(world):
    rem = remote.open_command(template(world), (SIZE, SIZE), timeout=60)
    assert rem.num_classes == 2 and rem.sha256 is None
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(rem.probabilities(x), load_model(world["model"], device="cpu").probabilities(x),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode, extra, needle", [
    ("fail", (), "exited with status 3; its output ends: loading weights...\nvendor licence expired"),
    ("nooutput", (), "wrote no output file"),
    ("shape", (), "has shape (64, 2, 10, 10)"),
    ("sleep", ("--timeout", "1"), "did not finish within 1 s"),
])
def test_bad_command_gives_one_clear_error_and_writes_nothing(world, capsys, mode, extra, needle):
    out = world["tmp"] / f"badcmd_{mode}"
    rc = cli("verify", "--command", template(world, mode), "--image-size", SIZE, SIZE, "--num-classes", 2,
             "--key", world["key"], "--out", out, "--samples", SAMPLES, *extra)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err, err
    assert nothing_written(out)


@pytest.mark.parametrize("tmpl, size, needle", [
    ("tool {input}", (SIZE, SIZE), "placeholder {output}"),
    ("no-such-program-here {input} {output}", (SIZE, SIZE), "was not found"),
    ("tool 'unbalanced {input} {output}", (SIZE, SIZE), "cannot be split"),
    ("tool {input} {output}", None, "--image-size"),
])
def test_bad_command_template(tmpl, size, needle):
    with pytest.raises(InputError) as exc:
        remote.open_command(tmpl, size)
    assert needle in str(exc.value)


# -- the command line ----------------------------------------------------------------------------------
def test_model_endpoint_command_are_mutually_exclusive(world, capsys):
    common = ("--key", world["key"], "--out", world["tmp"] / "never")
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--model", str(world["model"]), "--endpoint", world["url"], *map(str, common)])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["verify", *map(str, common)])
    assert exc.value.code == 2 and "one of the arguments --model --endpoint --command" in capsys.readouterr().err
    assert cli("verify", "--endpoint", world["url"], "--in-channels", 3, *common) == 2
    assert "are for --command" in capsys.readouterr().err
    assert nothing_written(world["tmp"] / "never")
