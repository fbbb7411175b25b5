"""StealthMark for 3D Slicer: verify and embed ownership watermarks of segmentation models.

The module is the Slicer face of StealthMarkLib. It never does the maths itself: it turns MRML nodes into
files, runs the ``stealthmark`` command (``python -m StealthMarkLib.cli ... --progress json``) in a child
process, and turns the command's files back into nodes. Everything the GUI does is a
:class:`StealthMarkLogic` call, so the same work can be scripted from Slicer's Python console::

    logic = slicer.util.getModuleLogic("StealthMark")
    report, attribution = logic.verifyVolumeNode(volumeNode, "model.pt", "key.json", "/tmp/report")

Settings live in the module's parameter node (:class:`StealthMarkParameters`) and are saved with the scene.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ctk
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_NAME = "StealthMark"
LIBRARY = "StealthMarkLib"
COMMAND_MODULE = "StealthMarkLib.cli"
# StealthMarkLib's dependencies (pyproject.toml; Testing/test_slicer_module.py keeps the two in step).
REQUIREMENTS = (
    "torch>=2.4",
    "monai>=1.4",
    "einops>=0.7",
    "numpy>=1.24",
    "lime==0.2.0.1",
    "scikit-image>=0.21",
    "scikit-learn>=1.3",
    "qrcode>=7.4",
    "zxing-cpp>=2.2",
    "pyzbar>=0.1.9",
    "pillow>=10",
    "SimpleITK>=2.3",
    "nibabel>=5",
    "pydicom>=2.4",
    "tqdm>=4.60",
    "onnx>=1.16",
    "onnxruntime>=1.18",
)
# Slicer's SimpleITK is built with Slicer's own IO; replacing it from PyPI breaks Slicer.
NEVER_INSTALL = ("SimpleITK",)
TORCH_REQUIREMENT = "torch>=2.4"
# StealthMarkLib.DEFAULT_EMBED_STEPS: the Steps box's default while "Keep the key image's mask" is cleared (the
# library is imported lazily; Testing/test_slicer_module.py keeps the two in step)
DEFAULT_EMBED_STEPS = 1800
# StealthMarkLib.KEEP_MASKS_EMBED_STEPS: the Steps box's default, with "Keep the key image's mask" ticked (the
# library's default recipe)
KEEP_MASKS_EMBED_STEPS = 3600
# StealthMarkLib.embed.EmbedConfig's batch (`stealthmark embed --batch-size` 8: the library's defaults; the same test
# keeps them in step)
DEFAULT_EMBED_BATCH = 8
DEVICES = ("auto", "cpu", "cuda")
CANCEL_GRACE_S = 10.0      # SIGTERM first (the command cleans up and exits 130), then SIGKILL
OUTPUT_DRAIN_S = 2.0       # after the child exits, how long to wait for a grandchild holding its pipes
LOW_GPU_MEMORY_GIB = 4.0
# Diverging maps for signed attributions, best first; the last is procedural and exists in every scene
# that has Slicer's colour logic (also slicer-core's).
ATTRIBUTION_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLColorTableNodefMRI",
)
ATTRIBUTION_OPACITY = 0.5


# ---------------------------------------------------------------------------------------------------------
# Finding the library
# ---------------------------------------------------------------------------------------------------------
def libraryParentDir() -> str | None:
    """The folder holding the StealthMarkLib package, added to ``sys.path`` when only the source tree has it.

    An installed extension puts StealthMarkLib into qt-scripted-modules/, which is on Slicer's path. A source
    checkout added through Application Settings > Modules has it one level above this file.
    """
    spec = importlib.util.find_spec(LIBRARY)
    if spec is not None and spec.origin:
        return str(Path(spec.origin).resolve().parent.parent)
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / LIBRARY / "__init__.py").is_file():
        if str(checkout) not in sys.path:
            sys.path.append(str(checkout))
        importlib.invalidate_caches()
        return str(checkout)
    return None


def reloadLibrary() -> list[str]:
    """Reload every loaded StealthMarkLib module, each after the library modules it uses, so that edits
    take effect without restarting Slicer. Returns the names in the order they were reloaded."""
    loaded = {n for n in sys.modules if n == LIBRARY or n.startswith(LIBRARY + ".")}

    def uses(name: str) -> set[str]:
        found = set()
        for value in list(vars(sys.modules[name]).values()):
            owner = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
            if isinstance(owner, str) and owner in loaded and owner != name:
                found.add(owner)
        return found

    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dependency in sorted(uses(name)):
            visit(dependency)
        order.append(name)

    for name in sorted(loaded):
        visit(name)
    for name in order:
        importlib.reload(sys.modules[name])
    return order


def pythonExecutable() -> str:
    """The Python that runs the command: PythonSlicer inside Slicer (on its PATH), this interpreter elsewhere."""
    if getattr(slicer, "app", None) is not None:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def isTestingMode() -> bool:
    """True when Slicer runs with --testing (installs are skipped then)."""
    app = getattr(slicer, "app", None)
    try:
        return bool(app.commandOptions().testingEnabled)
    except AttributeError:
        return False


# ---------------------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """How a child process ended, with everything it said."""

    args: list[str]
    returncode: int
    result: dict | None = None          # the command's final {"event": "result", ...}, if any
    error: str | None = None            # its {"event": "error"} message, or the end of its stderr
    log: list[str] = field(default_factory=list)
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.cancelled


class StealthMarkRunError(RuntimeError):
    """A run that failed: ``str(error)`` is the command's message, ``log`` everything it printed."""

    def __init__(self, message: str, log: list[str] | tuple[str, ...] = (), returncode: int | None = None):
        super().__init__(message)
        self.log = list(log)
        self.returncode = returncode

    @property
    def logText(self) -> str:
        return "\n".join(self.log)


class StealthMarkCancelled(StealthMarkRunError):
    """The run was cancelled; nothing was written and no node was added."""


class ProcessRunner:
    """Runs one child process without blocking: reads its JSON progress lines and its stderr on threads,
    hands them to callbacks from :meth:`poll` (on the caller's thread), and kills its process tree on cancel.

    ``onEvent(event)`` gets every JSON object the child prints on stdout, plus stderr and other non-JSON
    lines as ``{"event": "log", "message": line, "stream": "stderr"|"stdout"}``.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
                 onEvent: Callable[[dict], None] | None = None, cancelGrace: float = CANCEL_GRACE_S):
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self.onEvent = onEvent
        self.cancelGrace = float(cancelGrace)
        self.process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._openStreams = 0
        self._log: list[str] = []
        self._stderrTail: list[str] = []
        self._result: dict | None = None
        self._error: str | None = None
        self._cancelRequested = False
        self._killDeadline: float | None = None
        self._exitedAt: float | None = None
        self._finished: RunResult | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "ProcessRunner":
        kwargs: dict[str, Any] = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, encoding="utf-8", errors="replace", bufsize=1,
                                      env=self.env, cwd=self.cwd)
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # its own process group: cancel reaches grandchildren too
        self.process = subprocess.Popen(self.args, **kwargs)
        for stream, name in ((self.process.stdout, "stdout"), (self.process.stderr, "stderr")):
            self._openStreams += 1
            threading.Thread(target=self._read, args=(stream, name), daemon=True).start()
        return self

    def _read(self, stream, name: str) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put((name, None))

    @property
    def running(self) -> bool:
        return self.process is not None and self._finished is None

    def poll(self) -> RunResult | None:
        """Hand new output to the callbacks; return the :class:`RunResult` once the child is done."""
        if self._finished is not None:
            return self._finished
        if self.process is None:
            raise RuntimeError("the process was not started")
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._openStreams -= 1
            else:
                self._handleLine(name, line)
        code = self.process.poll()
        now = time.monotonic()
        if code is None:
            if self._killDeadline is not None and now >= self._killDeadline:
                self._killTree(hard=True)
                self._killDeadline = None
            return None
        if self._exitedAt is None:
            self._exitedAt = now
            if self._cancelRequested:
                self._killTree(hard=True)  # anything of its group still alive
        if self._openStreams > 0 and now - self._exitedAt < OUTPUT_DRAIN_S:
            return None
        self._finished = RunResult(args=self.args, returncode=code, result=self._result,
                                   error=self._error or self._fallbackError(code), log=list(self._log),
                                   cancelled=self._cancelRequested)
        return self._finished

    def wait(self, timeout: float | None = None, interval: float = 0.05,
             idle: Callable[[], None] | None = None) -> RunResult:
        """Block until the child is done (cancelling it if ``timeout`` passes); ``idle`` runs between polls."""
        start = time.monotonic()
        try:
            while True:
                result = self.poll()
                if result is not None:
                    return result
                if timeout is not None and time.monotonic() - start > timeout and not self._cancelRequested:
                    self.cancel()
                if idle is not None:
                    idle()
                time.sleep(interval)
        except BaseException:
            if self.running:  # KeyboardInterrupt or a failing callback: never leave the child running
                self.cancel()
                self._killTree(hard=True)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=5)
            raise

    def cancel(self) -> None:
        """Ask the child to stop (SIGTERM to its process group); it is killed after ``cancelGrace`` seconds."""
        if self.process is None or self._finished is not None or self._cancelRequested:
            return
        self._cancelRequested = True
        self._killDeadline = time.monotonic() + self.cancelGrace
        self._killTree(hard=False)

    # -- internals ----------------------------------------------------------------------------------
    def _emit(self, event: dict) -> None:
        if self.onEvent is not None:
            self.onEvent(event)

    def _handleLine(self, stream: str, line: str) -> None:
        if stream == "stdout" and line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                kind = event.get("event")
                if kind == "result":
                    self._result = {k: v for k, v in event.items() if k != "event"}
                elif kind == "error":
                    self._error = str(event.get("message", "the command failed"))
                    self._log.append("error: " + self._error)
                elif kind == "log":
                    self._log.append(str(event.get("message", "")))
                self._emit(event)
                return
        if not line.strip():
            return
        self._log.append(line)
        if stream == "stderr":
            self._stderrTail = (self._stderrTail + [line])[-20:]
        self._emit({"event": "log", "message": line, "stream": stream})

    def _fallbackError(self, code: int) -> str | None:
        if code == 0 and not self._cancelRequested:
            return None
        if self._cancelRequested:
            return "cancelled"
        for line in reversed(self._stderrTail):
            if line.strip() and not line.startswith(" "):
                return line.strip()
        return f"the command exited with status {code}"

    def _killTree(self, hard: bool) -> None:
        proc = self.process
        if proc is None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
            return
        sig = signal.SIGKILL if hard else signal.SIGTERM
        for pid in _descendants(proc.pid):  # those that left the group (setsid) too, where psutil can see them
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, sig)


def _descendants(pid: int) -> list[int]:
    try:
        import psutil
    except ImportError:
        return []
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


class StealthMarkJob:
    """One run of the command and what turns its output into Slicer results.

    ``finish(runResult)`` is called on the polling thread only when the command succeeded; its return value
    becomes :attr:`value`. The work folder is removed in every case. Poll it from a timer (the GUI) or
    block with :meth:`wait` (scripts).
    """

    def __init__(self, name: str, runner: ProcessRunner, workDir: str | None,
                 finish: Callable[[RunResult], Any]):
        self.name = name
        self.runner = runner
        self.workDir = workDir
        self._finish = finish
        self.finished = False
        self.value: Any = None
        self.exception: BaseException | None = None
        self.runResult: RunResult | None = None

    @property
    def cancelled(self) -> bool:
        return isinstance(self.exception, StealthMarkCancelled)

    def poll(self) -> bool:
        """Advance the job; True once it has finished (successfully or not)."""
        if self.finished:
            return True
        try:
            result = self.runner.poll()
        except BaseException as exc:  # a failing progress callback
            self.runner.onEvent = None
            self.runner.cancel()
            self.runner.wait()
            self._done(exc)
            return True
        if result is None:
            return False
        self.runResult = result
        if result.cancelled:
            self._done(StealthMarkCancelled(f"{self.name}: cancelled; nothing was written", result.log,
                                            result.returncode))
        elif not result.ok:
            self._done(StealthMarkRunError(f"{self.name} failed: {result.error}", result.log, result.returncode))
        else:
            try:
                self.value = self._finish(result)
            except BaseException as exc:
                self._done(exc if isinstance(exc, StealthMarkRunError)
                           else StealthMarkRunError(f"{self.name} failed: {exc}", result.log, result.returncode))
                return True
            self._done(None)
        return True

    def _done(self, exc: BaseException | None) -> None:
        self.exception = exc
        self.finished = True
        if self.workDir:
            shutil.rmtree(self.workDir, ignore_errors=True)

    def cancel(self) -> None:
        self.runner.cancel()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until done; return :attr:`value` or raise the run's error (also on cancel)."""
        start = time.monotonic()
        try:
            while not self.poll():
                if timeout is not None and time.monotonic() - start > timeout:
                    self.cancel()
                    timeout = None
                _processEvents()
                time.sleep(0.05)
        except BaseException:
            if not self.finished:
                self.cancel()
                self.runner.wait()
                self.poll()
            raise
        return self.outcome()

    def outcome(self) -> Any:
        if not self.finished:
            raise RuntimeError(f"{self.name} is still running")
        if self.exception is not None:
            raise self.exception
        return self.value


def _processEvents() -> None:
    """Keep Slicer's window alive while a script waits (nothing outside Slicer)."""
    app = getattr(slicer, "app", None)
    process = getattr(app, "processEvents", None)
    if callable(process):
        process()


# ---------------------------------------------------------------------------------------------------------
# Parameter node
# ---------------------------------------------------------------------------------------------------------
def _flag(value: Any) -> bool:
    """A bool setting from its stored text ("True"/"False") or a bool."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


class _Parameter:
    """A typed setting stored as a string parameter of the module's vtkMRMLScriptedModuleNode."""

    def __init__(self, kind: type, default: Any):
        self.kind = kind
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        raw = obj.parameterNode.GetParameter(self.name)
        if raw is None or raw == "":
            return self.default
        try:
            return self.kind(raw)
        except (TypeError, ValueError):
            return self.default

    def __set__(self, obj: Any, value: Any) -> None:
        text = "" if value is None else str(self.kind(value))
        if obj.parameterNode.GetParameter(self.name) != text:
            obj.parameterNode.SetParameter(self.name, text)


class _NodeParameter:
    """A node setting stored as a node reference (saved in the scene like any MRML reference)."""

    def __init__(self) -> None:
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.parameterNode.GetNodeReference(self.name)

    def __set__(self, obj: Any, node: Any) -> None:
        nodeId = node.GetID() if node is not None else None
        if obj.parameterNode.GetNodeReferenceID(self.name) != nodeId:
            obj.parameterNode.SetNodeReferenceID(self.name, nodeId)


class StealthMarkParameters:
    """Every setting of the module, kept in its parameter node so it is saved and restored with the scene.

    A small typed wrapper over ``vtkMRMLScriptedModuleNode`` parameters and node references (the storage
    ``slicer.parameterNodeWrapper`` uses too), so that it also works with plain MRML outside Slicer.
    """

    # Verify panel
    verifyVolume = _NodeParameter()
    verifyModelPath = _Parameter(str, "")
    verifyKeyPath = _Parameter(str, "")
    verifySlices = _Parameter(str, "")
    verifySamples = _Parameter(int, 0)       # 0: the key's setting
    verifySeed = _Parameter(int, -1)         # -1: the key's setting
    verifyNullKeys = _Parameter(int, 0)      # random keys to set the key against (0: none)
    verifyDevice = _Parameter(str, "auto")
    verifyOutputDir = _Parameter(str, "")
    verifyAttribution = _NodeParameter()     # the last attribution map made
    # Embed panel
    embedVolume = _NodeParameter()
    embedLabels = _NodeParameter()
    embedSegment = _Parameter(str, "")
    embedModelPath = _Parameter(str, "")
    embedKeyPath = _Parameter(str, "")
    embedPayload = _Parameter(str, "")
    embedOutputPath = _Parameter(str, "")
    embedSteps = _Parameter(int, KEEP_MASKS_EMBED_STEPS)
    embedBatchSize = _Parameter(int, DEFAULT_EMBED_BATCH)
    embedKeepMasks = _Parameter(_flag, True)
    embedDevice = _Parameter(str, "auto")

    def __init__(self, parameterNode: Any):
        self.parameterNode = parameterNode

    @classmethod
    def names(cls) -> list[str]:
        return [n for n, v in vars(cls).items() if isinstance(v, (_Parameter, _NodeParameter))]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StealthMarkParameters) and other.parameterNode is self.parameterNode

    def __hash__(self) -> int:
        return id(self.parameterNode)


# ---------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackageStatus:
    requirement: str
    name: str
    installed: str | None
    satisfied: bool

    @property
    def neverInstalled(self) -> bool:
        return self.name in NEVER_INSTALL


def _requirementName(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip()


def packageStatus(requirements: tuple[str, ...] = REQUIREMENTS) -> list[PackageStatus]:
    """Which of the library's packages are installed, checked with importlib.metadata (nothing is imported)."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging ships with pip
        Requirement = None
    out = []
    for req in requirements:
        name = _requirementName(req)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        satisfied = installed is not None
        if satisfied and Requirement is not None:
            try:
                satisfied = Requirement(req).specifier.contains(Version(installed), prereleases=True)
            except InvalidVersion:
                satisfied = True
        out.append(PackageStatus(req, name, installed, satisfied))
    return out


def computeDeviceDescription() -> str:
    """The device 'auto' will use: the CUDA GPU (name and memory) or the CPU."""
    try:
        importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown until PyTorch is installed"
    try:
        import torch

        if torch.backends.cuda.is_built() and torch.cuda.is_available():
            index = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(index)
            gib = props.total_memory / 2**30
            text = f"GPU {index}: {props.name}, {gib:.1f} GiB"
            if gib < LOW_GPU_MEMORY_GIB:
                text += " (little memory: choose the CPU device if runs fail)"
            return text
        reason = "this PyTorch has no CUDA support" if not torch.backends.cuda.is_built() else "no CUDA GPU found"
        return f"CPU ({reason}; runs are slower)"
    except Exception as exc:  # a broken torch install must not break the module
        return f"unknown: PyTorch did not load ({exc})"


# ---------------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------------
class StealthMark(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "StealthMark"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["The StealthMark developers"]
        self.parent.helpText = """
Harmless, black-box verifiable ownership watermarks for medical image segmentation models.
<ul>
<li><b>Verify</b> whether a model carries an owner's watermark: the key is blended into slices of a volume
loaded from DICOM or NIfTI (for a 3-D model, into slabs of consecutive slices), the model is queried as a black box, LIME recovers a QR code from its uncertainty,
and the verdict comes with a p-value. The LIME attribution map is added as a volume and overlaid on the input.</li>
<li><b>Embed</b> a watermark into your own model by fine-tuning it on an annotated volume; the Dice before
and after show that segmentation is unharmed.</li>
</ul>
The work runs in a separate process (Slicer stays responsive; Apply becomes Cancel).
See <a href="https://github.com/stealthmark/SlicerStealthMark">the documentation</a>.
"""
        self.parent.acknowledgementText = """
StealthMark is developed by the StealthMark developers (Apache-2.0). It builds on PyTorch, MONAI, the
lime package and 3D Slicer. The bundled sample is the ITK project's T1 brain MRI example data (Apache-2.0).
"""


# ---------------------------------------------------------------------------------------------------------
# Widget
# ---------------------------------------------------------------------------------------------------------
# (parameter, widget, kind): how each setting is shown; kinds: node, path, text, int, bool, device
PARAMETER_WIDGETS = (
    ("verifyVolume", "verifyVolumeSelector", "node"),
    ("verifyModelPath", "verifyModelPathLineEdit", "path"),
    ("verifyKeyPath", "verifyKeyPathLineEdit", "path"),
    ("verifySlices", "verifySlicesLineEdit", "text"),
    ("verifySamples", "verifySamplesSpinBox", "int"),
    ("verifySeed", "verifySeedSpinBox", "int"),
    ("verifyNullKeys", "verifyNullKeysSpinBox", "int"),
    ("verifyDevice", "verifyDeviceComboBox", "device"),
    ("verifyOutputDir", "verifyOutputDirLineEdit", "path"),
    ("embedVolume", "embedVolumeSelector", "node"),
    ("embedLabels", "embedLabelSelector", "node"),
    ("embedModelPath", "embedModelPathLineEdit", "path"),
    ("embedKeyPath", "embedKeyPathLineEdit", "path"),
    ("embedPayload", "embedPayloadLineEdit", "text"),
    ("embedOutputPath", "embedOutputPathLineEdit", "path"),
    ("embedSteps", "embedStepsSpinBox", "int"),
    ("embedBatchSize", "embedBatchSizeSpinBox", "int"),
    ("embedKeepMasks", "embedKeepMasksCheckBox", "bool"),
    ("embedDevice", "embedDeviceComboBox", "device"),
)
_SIGNALS = {"node": "currentNodeChanged(vtkMRMLNode*)", "path": "currentPathChanged(QString)",
            "text": "textChanged(QString)", "int": "valueChanged(int)", "bool": "toggled(bool)",
            "device": "currentIndexChanged(int)"}
_VERDICT_COLOURS = {"owned": "#1a7f37", "not-owned": "#555555", "inconclusive": "#b35900"}


def embedStepsForRecipe(steps: int, keepMasks: bool) -> int:
    """The Steps box after "Keep the key image's mask" is ticked (``keepMasks``) or cleared: the other recipe's
    default becomes this one's (keeping the mask learns more slowly); any other count is the user's and stays."""
    if keepMasks and steps == DEFAULT_EMBED_STEPS:
        return KEEP_MASKS_EMBED_STEPS
    if not keepMasks and steps == KEEP_MASKS_EMBED_STEPS:
        return DEFAULT_EMBED_STEPS
    return steps


def nullKeysText(nullKeys: dict | None) -> str:
    """One line for the Verify panel from report.json's ``null_keys`` ("" when the run had none)."""
    if not nullKeys:
        return ""
    return (f"z {float(nullKeys['z']):.1f}, rank p {float(nullKeys['p_value_rank']):.3g} against "
            f"{int(nullKeys['n_keys'])} random keys ({100.0 * float(nullKeys['mean']):.1f}% "
            f"+/- {100.0 * float(nullKeys['sd']):.1f}%)")


class StealthMarkWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI: reads and writes the parameter node, starts logic jobs, polls them from a QTimer."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: StealthMarkLogic | None = None
        self.ui = None
        self._parameters: StealthMarkParameters | None = None
        self._updatingGUI = False
        self._job: StealthMarkJob | None = None
        self._jobButton = None
        self._jobButtonText = ""
        self._jobDone: Callable[[Any], None] | None = None
        self._jobRetry: tuple[str, Callable] | None = None
        self._timer = None
        self._installNeeded = False

    # -- set-up -------------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/StealthMark.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = StealthMarkLogic()

        self.ui.verifyModelPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.verifyKeyPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.verifyOutputDirLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.embedModelPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.embedKeyPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.embedOutputPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Writable
        self.ui.verifyKeyPathLineEdit.nameFilters = ["Key files (*.json)", "All files (*)"]
        self.ui.embedKeyPathLineEdit.nameFilters = ["Key files (*.json)", "All files (*)"]
        for name in ("verifyModelPathLineEdit", "embedModelPathLineEdit", "embedOutputPathLineEdit"):
            getattr(self.ui, name).nameFilters = ["Models (*.pt *.pth *.ts *.torchscript)", "All files (*)"]
        self.ui.progressBar.hide()

        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._pollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        for _param, widgetName, kind in PARAMETER_WIDGETS:
            getattr(self.ui, widgetName).connect(_SIGNALS[kind], self.updateParameterNodeFromGUI)
        self.ui.embedLabelSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._refreshSegments)
        self.ui.embedSegmentComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.embedKeyPathLineEdit.connect("currentPathChanged(QString)", self._refreshCommitment)
        self.ui.embedKeepMasksCheckBox.connect("toggled(bool)", self.onKeepMasksToggled)

        self.ui.refreshSetupButton.connect("clicked(bool)", self.refreshSetup)
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.verifyApplyButton.connect("clicked(bool)", self.onVerifyApply)
        self.ui.embedApplyButton.connect("clicked(bool)", self.onEmbedApply)
        self.ui.embedCreateKeyButton.connect("clicked(bool)", self.onCreateKey)

        self.initializeParameterNode()
        self.refreshSetup()

    def cleanup(self):
        if self._job is not None and not self._job.finished:
            self._job.cancel()
            self._job.runner.wait()
            self._job.poll()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self._observeParameters(None)

    def onSceneStartClose(self, caller, event):
        if self._job is not None:  # its result would land in a scene that is going away
            self._cancelJob()
        self._observeParameters(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event):
        # a loaded scene brings its own parameter node: show its settings
        self.initializeParameterNode()

    def onReload(self):
        reloadLibrary()
        ScriptedLoadableModuleWidget.onReload(self)

    # -- parameter node <-> GUI -------------------------------------------------------------------
    def initializeParameterNode(self):
        parameters = self.logic.getParameterNode()
        if parameters.verifyVolume is None:
            parameters.verifyVolume = self._firstScalarVolume()
        self._observeParameters(parameters)

    @staticmethod
    def _firstScalarVolume():
        scene = slicer.mrmlScene
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            if not node.IsA("vtkMRMLLabelMapVolumeNode"):
                return node
        return None

    def _observeParameters(self, parameters: StealthMarkParameters | None):
        if self._parameters is not None and self._parameters.parameterNode is not None:
            self.removeObserver(self._parameters.parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.updateGUIFromParameterNode)
        self._parameters = parameters
        if parameters is not None:
            self.addObserver(parameters.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        p = self._parameters
        if p is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            for param, widgetName, kind in PARAMETER_WIDGETS:
                widget, value = getattr(self.ui, widgetName), getattr(p, param)
                if kind == "node":
                    widget.setCurrentNode(value)
                elif kind == "path":
                    if widget.currentPath != value:
                        widget.setCurrentPath(value)
                elif kind == "text":
                    if widget.text != value:
                        widget.setText(value)
                elif kind == "int":
                    widget.setValue(int(value))
                elif kind == "bool":
                    widget.setChecked(bool(value))
                elif kind == "device":
                    widget.setCurrentIndex(max(0, widget.findText(value)))
            self._refreshSegments()
            self._refreshCommitment()
            self._updateButtons()
        finally:
            self._updatingGUI = False

    def onKeepMasksToggled(self, checked):
        """The user ticked or cleared "Keep the key image's mask": the Steps box follows the recipe's default
        (see embedStepsForRecipe); a scene being shown (the parameter node driving the GUI) is left as it is."""
        if self._updatingGUI or self._parameters is None:
            return
        steps = embedStepsForRecipe(int(self.ui.embedStepsSpinBox.value), bool(checked))
        if steps != self.ui.embedStepsSpinBox.value:
            self.ui.embedStepsSpinBox.setValue(steps)

    def updateParameterNodeFromGUI(self, *args):
        p = self._parameters
        if p is None or self._updatingGUI:
            return
        wasModifying = p.parameterNode.StartModify()
        try:
            for param, widgetName, kind in PARAMETER_WIDGETS:
                widget = getattr(self.ui, widgetName)
                if kind == "node":
                    value = widget.currentNode()
                elif kind == "path":
                    value = widget.currentPath
                elif kind == "text":
                    value = widget.text
                elif kind == "int":
                    value = widget.value
                elif kind == "bool":
                    value = bool(widget.checked)
                else:
                    value = widget.currentText or "auto"
                setattr(p, param, value)
            index = self.ui.embedSegmentComboBox.currentIndex
            if index >= 0:
                p.embedSegment = self.ui.embedSegmentComboBox.itemData(index) or ""
        finally:
            p.parameterNode.EndModify(wasModifying)
        self._updateButtons()

    def _refreshSegments(self, *args):
        """Fill the segment list from the chosen segmentation (segment names) or labelmap (label values)."""
        combo = self.ui.embedSegmentComboBox
        p = self._parameters
        node = self.ui.embedLabelSelector.currentNode()
        wanted = p.embedSegment if p is not None else ""
        choices = self.logic.segmentChoices(node) if node is not None else []
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            for text, value in choices:
                combo.addItem(text, value)
            values = [value for _text, value in choices]
            combo.setCurrentIndex(values.index(wanted) if wanted in values else (0 if values else -1))
        finally:
            combo.blockSignals(wasBlocked)
        chosen = combo.itemData(combo.currentIndex) or "" if combo.currentIndex >= 0 else ""
        if p is not None and chosen != wanted:  # the stored choice is not offered: store what is shown
            p.embedSegment = chosen

    def _refreshCommitment(self, *args):
        path = self.ui.embedKeyPathLineEdit.currentPath
        if not path:
            self.ui.embedCommitmentLabel.setText("")
            return
        try:
            self.ui.embedCommitmentLabel.setText(self.logic.keyCommitment(path))
        except Exception as exc:
            self.ui.embedCommitmentLabel.setText(f"(cannot read the key: {exc})")

    def _updateButtons(self):
        p = self._parameters
        busy = self._job is not None
        if p is None:
            return
        verifyReady = bool(p.verifyVolume and p.verifyModelPath and p.verifyKeyPath)
        embedReady = bool(p.embedVolume and p.embedLabels and p.embedSegment and p.embedModelPath
                          and p.embedKeyPath and p.embedOutputPath)
        self.ui.verifyApplyButton.enabled = (self._jobButton is self.ui.verifyApplyButton) or (verifyReady and not busy)
        self.ui.embedApplyButton.enabled = (self._jobButton is self.ui.embedApplyButton) or (embedReady and not busy)
        self.ui.embedCreateKeyButton.enabled = bool(p.embedPayload.strip()) and not busy
        self.ui.installButton.enabled = (self._jobButton is self.ui.installButton) or (
            not busy and not isTestingMode() and self._installNeeded)

    # -- setup ------------------------------------------------------------------------------------
    def refreshSetup(self, *args):
        lines = []
        statuses = packageStatus()
        for s in statuses:
            if s.satisfied:
                lines.append(f"<span style='color:#1a7f37'>&#10003; {s.name} {s.installed}</span>")
            elif s.installed:
                lines.append(f"<span style='color:#b35900'>&#9888; {s.name} {s.installed} "
                             f"(needs {s.requirement})</span>")
            else:
                note = " (Slicer's own; never installed from PyPI)" if s.neverInstalled else ""
                lines.append(f"<span style='color:#b00020'>&#10007; {s.name} missing{note}</span>")
        self.ui.packagesLabel.setText("<br>".join(lines))
        self._installNeeded = any(not s.satisfied and not s.neverInstalled for s in statuses)
        self.ui.deviceLabel.setText(computeDeviceDescription())
        self._updateButtons()

    def onInstall(self, *args):
        if self._job is not None:
            self._cancelJob()
            return
        if isTestingMode():
            self._log("Installs are skipped in --testing mode.")
            return
        missing = [s for s in packageStatus() if not s.satisfied and not s.neverInstalled]
        if not missing:
            self.refreshSetup()
            return
        names = ", ".join(s.requirement for s in missing)
        if not slicer.util.confirmOkCancelDisplay(
                f"StealthMark needs these Python packages in Slicer's Python:\n\n{names}\n\n"
                "PyTorch is installed through the PyTorch extension (it picks the build for your GPU); "
                "Slicer's SimpleITK is never replaced. This can take several minutes. Install now?",
                windowTitle="StealthMark: install packages"):
            return
        try:
            with slicer.util.WaitCursor():
                self.logic.installTorch(progressCallback=self._onEvent)
            job = self.logic.startInstall(progressCallback=self._onEvent)
        except Exception as exc:
            self._showError("Installing packages failed", exc)
            return
        if job is None:
            self.refreshSetup()
            return
        self.ui.progressBar.setRange(0, 0)  # pip says nothing measurable: a busy bar
        self._startJob(job, self.ui.installButton, lambda _value: self._installDone())

    def _installDone(self):
        self.refreshSetup()
        self._setStatus("Packages installed. Restart Slicer if a package was upgraded.")

    # -- verify -----------------------------------------------------------------------------------
    def onVerifyApply(self, *args):
        if self._job is not None:
            self._cancelJob()
            return
        p = self._parameters
        if not p.verifyOutputDir:
            p.verifyOutputDir = str(self.logic.defaultOutputDir("verify", p.verifyVolume))
        self._clearVerifyResults()
        try:
            job = self.logic.startVerify(
                p.verifyVolume, p.verifyModelPath, p.verifyKeyPath, p.verifyOutputDir,
                slices=p.verifySlices.strip() or None,
                samples=p.verifySamples if p.verifySamples > 0 else None,
                seed=p.verifySeed if p.verifySeed >= 0 else None,
                device=p.verifyDevice, progressCallback=self._onEvent, nullKeys=p.verifyNullKeys)
        except Exception as exc:
            self._showError("Cannot start the verification", exc)
            return
        self._startJob(job, self.ui.verifyApplyButton, self._verifyDone, retry=("verifyDevice", self.onVerifyApply))

    def _clearVerifyResults(self):
        for name in ("verdictLabel", "payloadLabel", "agreementLabel", "pValueLabel", "nullKeysLabel",
                     "reportLinkLabel"):
            getattr(self.ui, name).setText("")
        self.ui.qrImageLabel.clear()

    def _verifyDone(self, value):
        report, attributionNode = value
        self._parameters.verifyAttribution = attributionNode
        self.showReport(report, self._parameters.verifyOutputDir)
        self._setStatus(f"Verification finished: {report.get('verdict')}")

    def showReport(self, report: dict, outDir: str):
        verdict = str(report.get("verdict", "?"))
        colour = _VERDICT_COLOURS.get(verdict, "#000000")
        self.ui.verdictLabel.setText(f"<b><span style='color:{colour}'>{verdict}</span></b>")
        payload = report.get("payload_decoded")
        match = report.get("payload_match")
        self.ui.payloadLabel.setText("(no QR code decoded)" if not payload else
                                     f"{payload} ({'matches the key' if match else 'does not match the key'})")
        agreement = report.get("data_module_agreement")
        errors, modules = report.get("bit_errors"), report.get("n_data_modules")
        self.ui.agreementLabel.setText("" if agreement is None else
                                       f"{100.0 * float(agreement):.1f}% ({errors} of {modules} data modules wrong)")
        pValue = report.get("p_value")
        self.ui.pValueLabel.setText("" if pValue is None else f"{float(pValue):.3g}")
        self.ui.nullKeysLabel.setText(nullKeysText(report.get("null_keys")))
        qrPath = Path(outDir) / "qr.png"
        if qrPath.is_file():
            pixmap = qt.QPixmap(str(qrPath))
            self.ui.qrImageLabel.setPixmap(pixmap.scaled(200, 200, qt.Qt.KeepAspectRatio, qt.Qt.FastTransformation))
        html = Path(outDir) / "report.html"
        if html.is_file():
            self.ui.reportLinkLabel.setText(f"<a href='{qt.QUrl.fromLocalFile(str(html)).toString()}'>{html}</a>")

    # -- embed ------------------------------------------------------------------------------------
    def onCreateKey(self, *args):
        p = self._parameters
        payload = p.embedPayload.strip()
        if not payload or self._job is not None:
            return
        start = p.embedKeyPath or str(Path.home() / "stealthmark-key.json")
        path = qt.QFileDialog.getSaveFileName(None, "Save the new key (keep it secret)", start,
                                              "Key files (*.json)")
        if not path:
            return
        try:
            job = self.logic.startCreateKey(payload, path, overwrite=True, progressCallback=self._onEvent)
        except Exception as exc:
            self._showError("Cannot create the key", exc)
            return

        def done(commitment):
            p.embedKeyPath = path
            self.ui.embedCommitmentLabel.setText(commitment)
            self._setStatus(f"Key written to {path}. Register its commitment {commitment} to prove ownership later.")

        self._startJob(job, self.ui.embedCreateKeyButton, done)

    def onEmbedApply(self, *args):
        if self._job is not None:
            self._cancelJob()
            return
        p = self._parameters
        if Path(p.embedOutputPath).exists() and not slicer.util.confirmOkCancelDisplay(
                f"{p.embedOutputPath} exists. Replace it?", windowTitle="StealthMark"):
            return
        for name in ("diceBeforeLabel", "diceAfterLabel", "flipRateLabel", "embedOutputLabel"):
            getattr(self.ui, name).setText("")
        try:
            job = self.logic.startEmbed(p.embedVolume, p.embedLabels, p.embedSegment, p.embedModelPath,
                                        p.embedKeyPath, p.embedOutputPath, steps=p.embedSteps,
                                        device=p.embedDevice, keepTriggerMasks=p.embedKeepMasks,
                                        batchSize=p.embedBatchSize,
                                        progressCallback=self._onEvent)
        except Exception as exc:
            self._showError("Cannot start embedding", exc)
            return
        self._startJob(job, self.ui.embedApplyButton, self._embedDone, retry=("embedDevice", self.onEmbedApply))

    def _embedDone(self, harmlessness: dict):
        self.showHarmlessness(harmlessness, self._parameters.embedOutputPath)
        self._setStatus(f"Watermarked model written to {self._parameters.embedOutputPath}")

    def showHarmlessness(self, h: dict, modelPath: str):
        before = h.get("original", {}).get("dice")
        after = h.get("watermarked", {}).get("dice")
        self.ui.diceBeforeLabel.setText("" if before is None else f"{float(before):.4f}")
        drop = h.get("dice_drop_points")
        dropText = "" if drop is None else f" (drop {float(drop):.2f} points)"
        self.ui.diceAfterLabel.setText("" if after is None else f"{float(after):.4f}{dropText}")
        flip = h.get("flip_rate_clean")
        self.ui.flipRateLabel.setText("" if flip is None else f"{100.0 * float(flip):.2f}% of pixels change class")
        self.ui.embedOutputLabel.setText(str(modelPath))

    # -- running jobs -----------------------------------------------------------------------------
    def _startJob(self, job: StealthMarkJob, button, done: Callable[[Any], None],
                  retry: tuple[str, Callable] | None = None):
        self._job, self._jobButton, self._jobDone, self._jobRetry = job, button, done, retry
        self._jobButtonText = button.text
        button.setText("Cancel")
        self.ui.progressBar.show()
        if self.ui.progressBar.maximum != 0:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.setValue(0)
        self._setStatus(f"{job.name} running...")
        self._log(f"--- {job.name}: {' '.join(job.runner.args)}")
        self._updateButtons()
        self._timer.start()

    def _offerCpuRetry(self, exc: BaseException, retry: tuple[str, Callable] | None) -> bool:
        """After a GPU out-of-memory failure (exit status 3), offer to run the same job on the CPU."""
        if retry is None or not isinstance(exc, StealthMarkRunError) or exc.returncode != 3:
            return False
        deviceParameter, apply = retry
        if "gpu memory" not in str(exc).lower() or getattr(self._parameters, deviceParameter) == "cpu":
            return False
        self._log(str(exc))
        other = ("\n\n(Or Cancel, lower the Batch size and embed again on the GPU.)"
                 if deviceParameter == "embedDevice" else "")
        if not slicer.util.confirmOkCancelDisplay(f"{exc}\n\nRun it again on the CPU (slower)?{other}",
                                                  windowTitle="StealthMark: out of GPU memory"):
            return False
        setattr(self._parameters, deviceParameter, "cpu")
        apply()
        return True

    def _cancelJob(self):
        if self._job is not None:
            self._setStatus(f"Cancelling {self._job.name}...")
            self._job.cancel()

    def _pollJob(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        if not job.poll():
            return
        self._timer.stop()
        self._jobButton.setText(self._jobButtonText)
        done, retry = self._jobDone, self._jobRetry
        self._job, self._jobButton, self._jobDone, self._jobRetry = None, None, None, None
        self.ui.progressBar.hide()
        self.ui.progressBar.setRange(0, 100)
        self._updateButtons()
        if job.cancelled:
            self._setStatus(f"{job.name} cancelled; nothing was written.")
        elif job.exception is not None:
            if not self._offerCpuRetry(job.exception, retry):
                self._showError(f"{job.name} failed", job.exception)
        else:
            try:
                done(job.value)
            except Exception as exc:
                self._showError(f"Showing the result of {job.name} failed", exc)

    def _onEvent(self, event: dict):
        kind = event.get("event")
        bar = self.ui.progressBar
        if kind == "start":
            total = int(event.get("total") or 0)
            bar.setRange(0, max(total, 0))
            bar.setValue(0)
            self._setStatus(f"{event.get('stage', '')} {event.get('message', '')}".strip())
        elif kind == "progress":
            total = int(event.get("total") or 0)
            if total > 0:
                bar.setRange(0, total)
                bar.setValue(min(int(event.get("done") or 0), total))
            message = event.get("message") or ""
            self._setStatus(f"{event.get('stage', '')}: {event.get('done')}/{total} {message}".strip())
        elif kind in ("log", "error"):
            self._log(str(event.get("message", "")))

    def _setStatus(self, text: str):
        self.ui.statusLabel.setText(text)

    def _log(self, text: str):
        if text:
            self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    def _showError(self, title: str, exc: BaseException):
        log = exc.logText if isinstance(exc, StealthMarkRunError) else ""
        self._setStatus(f"{title}: {exc}")
        self._log(f"{title}: {exc}")
        slicer.util.errorDisplay(f"{title}:\n{exc}", detailedText=log or None)


# ---------------------------------------------------------------------------------------------------------
# Logic
# ---------------------------------------------------------------------------------------------------------
class StealthMarkLogic(ScriptedLoadableModuleLogic):
    """All the module's work, usable without the GUI (from Slicer's Python console or a script).

    Long work runs the ``stealthmark`` command in a child process. The ``start...`` methods return a
    :class:`StealthMarkJob` to poll or cancel; the plain methods (:meth:`verifyVolumeNode`,
    :meth:`embedFromNodes`, :meth:`createKey`) block until done. A failed or cancelled run raises
    :class:`StealthMarkRunError` / :class:`StealthMarkCancelled` and leaves no node and no output file.
    ``progressCallback(event)`` receives the command's JSON progress events
    (``{"event": "progress", "stage": ..., "done": n, "total": N, "message": ...}``) and its log lines
    (``{"event": "log", "message": ...}``).
    """

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.tempRoot: str | None = None   # where work folders go (default: Slicer's temporary folder)

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    # -- parameter node ---------------------------------------------------------------------------
    def getParameterNode(self) -> StealthMarkParameters:
        """The module's settings (a singleton vtkMRMLScriptedModuleNode, created on first use)."""
        scene = self.scene
        node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(MODULE_NAME)
            node.SetName(scene.GenerateUniqueName(MODULE_NAME))
            node.SetAttribute("ModuleName", MODULE_NAME)
            node = scene.AddNode(node)
        return StealthMarkParameters(node)

    # -- the command ------------------------------------------------------------------------------
    def commandArgs(self, *args: str) -> list[str]:
        return [pythonExecutable(), "-m", COMMAND_MODULE, *[str(a) for a in args]]

    def commandEnvironment(self) -> dict[str, str]:
        env = dict(os.environ)
        parent = libraryParentDir()
        if parent:
            paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            env["PYTHONPATH"] = os.pathsep.join([parent] + paths)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        return env

    def makeWorkDir(self, kind: str) -> Path:
        root = self.tempRoot
        if root is None:
            app = getattr(slicer, "app", None)
            root = getattr(app, "temporaryPath", None) or tempfile.gettempdir()
        Path(root).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"StealthMark-{kind}-", dir=root))

    def defaultOutputDir(self, kind: str, node=None) -> Path:
        app = getattr(slicer, "app", None)
        base = Path(getattr(app, "temporaryPath", None) or tempfile.gettempdir()) / "StealthMark"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", node.GetName()) if node is not None else kind
        return base / f"{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"

    def startCommand(self, name: str, args: list[str], workDir: Path | None, finish: Callable[[RunResult], Any],
                     progressCallback: Callable[[dict], None] | None = None) -> StealthMarkJob:
        runner = ProcessRunner(self.commandArgs(*args), env=self.commandEnvironment(), cwd=str(workDir or "."),
                               onEvent=progressCallback)
        job = StealthMarkJob(name, runner, str(workDir) if workDir else None, finish)
        try:
            runner.start()
        except OSError as exc:
            job._done(StealthMarkRunError(f"{name}: cannot start {runner.args[0]}: {exc}"))
            raise job.exception from None
        return job

    # -- keys -------------------------------------------------------------------------------------
    def keyCommitment(self, keyPath: str) -> str:
        """The SHA-256 commitment of a key file, checked against its contents."""
        libraryParentDir()
        from StealthMarkLib.key import load_key

        return load_key(keyPath).commitment

    def startCreateKey(self, payload: str, path: str, overwrite: bool = False,
                       progressCallback: Callable[[dict], None] | None = None) -> StealthMarkJob:
        target = Path(path)
        if not str(payload).strip():
            raise ValueError("the payload is empty: type the text the watermark should carry")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists: a key cannot be recreated, so it is never replaced silently")
        if target.is_dir():
            raise IsADirectoryError(f"{target} is a folder; give a file name for the key")
        work = self.makeWorkDir("keygen")
        produced = work / "key.json"

        def finish(result: RunResult) -> str:
            if not produced.is_file():
                raise StealthMarkRunError("keygen finished but wrote no key file", result.log)
            commitment = (result.result or {}).get("commitment") or json.loads(produced.read_text())["commitment"]
            _publish({produced: target}, secret=True)
            return str(commitment)

        return self.startCommand("Key creation", ["keygen", f"--payload={payload}", f"--out={produced}",
                                                  "--progress=json"], work, finish, progressCallback)

    def createKey(self, payload: str, path: str, overwrite: bool = False,
                  progressCallback: Callable[[dict], None] | None = None) -> str:
        """Create a key holding ``payload`` at ``path``; return its commitment (register it, keep the key secret)."""
        return self.startCreateKey(payload, path, overwrite, progressCallback).wait()

    # -- verify -----------------------------------------------------------------------------------
    def startVerify(self, volumeNode, modelPath: str, keyPath: str, outDir: str, slices: str | None = None,
                    samples: int | None = None, seed: int | None = None, device: str = "auto",
                    progressCallback: Callable[[dict], None] | None = None, nullKeys: int = 0) -> StealthMarkJob:
        _checkVolumeNode(volumeNode, "input volume")
        if isinstance(nullKeys, bool) or not isinstance(nullKeys, int) or nullKeys == 1 or nullKeys < 0:
            raise ValueError(f"random keys: 0 (none) or at least 2, not {nullKeys!r}")
        _checkFile(modelPath, "model file")
        _checkFile(keyPath, "key file")
        if not outDir:
            raise ValueError("choose a folder for the report")
        _checkDevice(device)
        work = self.makeWorkDir("verify")
        try:
            inputPath = work / "input.nrrd"
            self.writeVolumeNode(volumeNode, inputPath)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        produced = work / "out"
        args = ["verify", f"--model={modelPath}", f"--key={keyPath}", f"--volume={inputPath}", f"--out={produced}",
                f"--device={device}", "--progress=json"]
        if slices:
            args.append(f"--slices={slices}")
        if samples is not None:
            args.append(f"--samples={int(samples)}")
        if seed is not None:
            args.append(f"--seed={int(seed)}")
        if nullKeys:
            args.append(f"--null-keys={nullKeys}")
        nodeName = f"{volumeNode.GetName()} StealthMark attribution"

        def finish(result: RunResult):
            reportPath, mapPath = produced / "report.json", produced / "lime_map.nii.gz"
            for p in (reportPath, mapPath):
                if not p.is_file():
                    raise StealthMarkRunError(f"verification finished but wrote no {p.name}", result.log)
            report = json.loads(reportPath.read_text(encoding="utf-8"))
            attribution = self.attributionNodeFromFile(mapPath, volumeNode, nodeName)
            published = _publish({f: Path(outDir) / f.name for f in sorted(produced.iterdir()) if f.is_file()})
            try:
                self.addAttributionNode(attribution, volumeNode, report)
            except BaseException:
                for path in published:
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise
            return report, attribution

        return self.startCommand("Verification", args, work, finish, progressCallback)

    def verifyVolumeNode(self, volumeNode, modelPath: str, keyPath: str, outDir: str, slices: str | None = None,
                         samples: int | None = None, seed: int | None = None, device: str = "auto",
                         progressCallback: Callable[[dict], None] | None = None, nullKeys: int = 0):
        """Verify ``modelPath`` against ``keyPath`` on the slices of ``volumeNode``.

        ``nullKeys`` K >= 2 also verifies with K random keys; the report's ``null_keys`` then sets the key's
        agreement against theirs (``stealthmark verify --null-keys``).

        Returns ``(report, attributionNode)``: the report as a dict (``verdict``, ``payload_decoded``,
        ``payload_match``, ``data_module_agreement``, ``p_value``, ...) and a new vtkMRMLScalarVolumeNode
        holding the LIME attribution map on exactly the input's voxel grid, shown as a colour overlay.
        report.json, report.html, qr.png and lime_map.nii.gz are saved in ``outDir``.
        """
        return self.startVerify(volumeNode, modelPath, keyPath, outDir, slices, samples, seed, device,
                                progressCallback, nullKeys).wait()

    # -- embed ------------------------------------------------------------------------------------
    def startEmbed(self, volumeNode, segmentationOrLabelmapNode, segmentId: str | int | None, modelPath: str,
                   keyPath: str, outPath: str, steps: int = KEEP_MASKS_EMBED_STEPS, device: str = "auto",
                   progressCallback: Callable[[dict], None] | None = None,
                   keepTriggerMasks: bool = True, batchSize: int | None = None) -> StealthMarkJob:
        _checkVolumeNode(volumeNode, "training volume")
        if segmentationOrLabelmapNode is None:
            raise ValueError("choose a segmentation or a labelmap with the annotation")
        _checkFile(modelPath, "model file")
        _checkFile(keyPath, "key file")
        _checkDevice(device)
        if not outPath:
            raise ValueError("choose where to write the watermarked model")
        target = Path(outPath)
        for given in (modelPath, keyPath):
            if target.resolve() == Path(given).resolve():
                raise ValueError(f"the output {target} would overwrite an input; choose another file name")
        if int(steps) < 1:
            raise ValueError("steps must be at least 1")
        if batchSize is not None and int(batchSize) < 1:
            raise ValueError(f"the batch size must be at least 1, got {batchSize}")
        work = self.makeWorkDir("embed")
        try:
            dataPath, labelPath = work / "volume.nrrd", work / "labels.nrrd"
            self.writeVolumeNode(volumeNode, dataPath)
            label = self.writeLabelFile(volumeNode, segmentationOrLabelmapNode, segmentId, labelPath)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        produced = work / "out" / target.name
        args = ["embed", f"--model={modelPath}", f"--data={dataPath}", f"--labels={labelPath}", f"--label={label}",
                f"--key={keyPath}", f"--out={produced}", f"--steps={int(steps)}", f"--device={device}",
                "--progress=json", "--keep-trigger-masks" if keepTriggerMasks else "--no-keep-trigger-masks"] + \
               ([f"--batch-size={int(batchSize)}"] if batchSize is not None else [])

        def finish(result: RunResult) -> dict:
            info = result.result or {}
            harmPath = Path(info.get("harmlessness_file") or "")
            if not harmPath.is_absolute():  # relative to the command's working folder
                harmPath = work / harmPath
            if not harmPath.is_file():
                found = sorted(produced.parent.glob("*.harmlessness.json"))
                harmPath = found[0] if found else harmPath
            if not produced.is_file() or not harmPath.is_file():
                raise StealthMarkRunError("embedding finished but its model or harmlessness file is missing",
                                          result.log)
            harmlessness = json.loads(harmPath.read_text(encoding="utf-8"))
            moves = {produced: target, harmPath: target.parent / harmPath.name}
            spec = produced.with_suffix(".json")  # a state-dict model's spec travels with it
            if spec.is_file() and spec != harmPath:
                moves[spec] = target.with_suffix(".json")
            _publish(moves)
            return harmlessness

        return self.startCommand("Embedding", args, work, finish, progressCallback)

    def embedFromNodes(self, volumeNode, segmentationOrLabelmapNode, segmentId: str | int | None, modelPath: str,
                       keyPath: str, outPath: str, steps: int = KEEP_MASKS_EMBED_STEPS, device: str = "auto",
                       progressCallback: Callable[[dict], None] | None = None, keepTriggerMasks: bool = True,
                       batchSize: int | None = None) -> dict:
        """Watermark ``modelPath`` by fine-tuning on ``volumeNode`` with one segment as the annotation.

        ``segmentationOrLabelmapNode`` is a vtkMRMLSegmentationNode (``segmentId``: a segment ID or name;
        None when it has one segment) or a vtkMRMLLabelMapVolumeNode on the volume's grid (``segmentId``: a
        label value, or "any" / None for every non-zero voxel). Writes ``outPath`` and, beside it,
        ``<name>.harmlessness.json``; returns that dict (``original``/``watermarked`` Dice, ``flip_rate_clean``).
        ``keepTriggerMasks``: trigger images keep the original's mask (the default; False: ``stealthmark embed
        --no-keep-trigger-masks``, which empties the key image's mask and needs half the steps).
        ``batchSize``: images per step (``stealthmark embed --batch-size``; None: the library's default).
        """
        return self.startEmbed(volumeNode, segmentationOrLabelmapNode, segmentId, modelPath, keyPath, outPath,
                               steps, device, progressCallback, keepTriggerMasks=keepTriggerMasks,
                               batchSize=batchSize).wait()

    # -- setup ------------------------------------------------------------------------------------
    def packageStatus(self) -> list[PackageStatus]:
        return packageStatus()

    def computeDeviceDescription(self) -> str:
        return computeDeviceDescription()

    def installTorch(self, progressCallback: Callable[[dict], None] | None = None) -> bool:
        """Install PyTorch through the PyTorch extension (the right CUDA build). False if that extension is absent."""
        if isTestingMode():
            raise RuntimeError("installs are skipped in --testing mode")
        torchStatus = packageStatus((TORCH_REQUIREMENT,))[0]
        if torchStatus.satisfied:
            return True
        try:
            import PyTorchUtils
        except ImportError:
            if progressCallback:
                progressCallback({"event": "log", "message": "The PyTorch extension is not installed: installing "
                                  "torch from PyPI (install the PyTorch extension for a build matching your GPU)."})
            return False
        if progressCallback:
            progressCallback({"event": "log", "message": "Installing PyTorch through the PyTorch extension..."})
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):])
        if torch is None:
            raise RuntimeError("the PyTorch extension could not install PyTorch; see its messages")
        return True

    def startInstall(self, progressCallback: Callable[[dict], None] | None = None) -> StealthMarkJob | None:
        """Install the missing packages with pip in a child process; None when nothing is missing.

        SimpleITK and an installed torch are pinned by a constraints file, so pip can never replace them.
        """
        if isTestingMode():
            raise RuntimeError("installs are skipped in --testing mode")
        statuses = packageStatus()
        todo = [s.requirement for s in statuses if not s.satisfied and not s.neverInstalled]
        if not todo:
            return None
        work = self.makeWorkDir("install")
        pins = [f"{s.name}=={s.installed}" for s in statuses
                if s.installed and (s.neverInstalled or s.name == "torch")]
        constraints = work / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
        args = [pythonExecutable(), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                "--constraint", str(constraints), *todo]
        runner = ProcessRunner(args, env=self.commandEnvironment(), cwd=str(work), onEvent=progressCallback)
        job = StealthMarkJob("Package installation", runner, str(work), lambda result: todo)
        runner.start()
        return job

    # -- nodes <-> files --------------------------------------------------------------------------
    def writeVolumeNode(self, volumeNode, path: str | Path) -> Path:
        """Write a volume node's voxels and IJK-to-RAS geometry to a file (NRRD or NIfTI by suffix)."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(False)
        if not storage.WriteData(volumeNode):
            raise RuntimeError(f"cannot write {volumeNode.GetName()} to {path}")
        return Path(path)

    def segmentChoices(self, node) -> list[tuple[str, str]]:
        """(text, value) pairs for the segment list: segments of a segmentation, label values of a labelmap."""
        if node is None:
            return []
        if node.IsA("vtkMRMLSegmentationNode"):
            seg = node.GetSegmentation()
            return [(seg.GetNthSegment(i).GetName(), seg.GetNthSegmentID(i)) for i in range(seg.GetNumberOfSegments())]
        if node.IsA("vtkMRMLLabelMapVolumeNode") and node.GetImageData() is not None:
            lo, hi = node.GetImageData().GetScalarRange()
            if hi - lo > 1000:  # not a label map to list value by value
                return [("any non-zero label", "any")]
            import numpy as np

            values = [int(v) for v in np.unique(slicer.util.arrayFromVolume(node)) if v != 0]
            return [("any non-zero label", "any")] + [(f"label {v}", str(v)) for v in values]
        return []

    def writeLabelFile(self, volumeNode, labelsNode, segmentId: str | int | None, path: str | Path) -> str:
        """Write the annotation on the volume's grid to ``path``; return the command's --label value."""
        if labelsNode.IsA("vtkMRMLSegmentationNode"):
            segmentId = self._segmentId(labelsNode, segmentId)
            scene = self.scene
            before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
            try:
                labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__StealthMark_export__")
                ids = vtk.vtkStringArray()
                ids.InsertNextValue(segmentId)
                logicClass = slicer.vtkSlicerSegmentationsModuleLogic
                if not logicClass.ExportSegmentsToLabelmapNode(labelsNode, ids, labelmap, volumeNode):
                    raise RuntimeError(f"cannot export segment {segmentId} of {labelsNode.GetName()}")
                self.writeVolumeNode(labelmap, path)
            finally:  # the export's labelmap, display and colour nodes: none may stay in the scene
                for i in reversed(range(scene.GetNumberOfNodes())):
                    node = scene.GetNthNode(i)
                    if node is not None and node.GetID() not in before:
                        scene.RemoveNode(node)
            return "any"
        if labelsNode.IsA("vtkMRMLLabelMapVolumeNode"):
            _checkSameGrid(labelsNode, volumeNode)
            self.writeVolumeNode(labelsNode, path)
            value = "any" if segmentId in (None, "", "any") else str(int(segmentId))
            return value
        raise ValueError(f"{labelsNode.GetName()} is neither a segmentation nor a labelmap volume")

    @staticmethod
    def _segmentId(segmentationNode, segmentId: str | int | None) -> str:
        seg = segmentationNode.GetSegmentation()
        ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
        if not ids:
            raise ValueError(f"the segmentation {segmentationNode.GetName()} has no segments")
        if segmentId in (None, ""):
            if len(ids) > 1:
                names = ", ".join(seg.GetSegment(i).GetName() for i in ids)
                raise ValueError(f"the segmentation {segmentationNode.GetName()} has several segments ({names}): "
                                 "choose one")
            return ids[0]
        if str(segmentId) in ids:
            return str(segmentId)
        byName = seg.GetSegmentIdBySegmentName(str(segmentId))
        if byName:
            return byName
        raise ValueError(f"the segmentation {segmentationNode.GetName()} has no segment {segmentId!r}")

    def attributionNodeFromFile(self, path: str | Path, referenceNode, name: str):
        """Read a map the command wrote for ``referenceNode`` into a new node (not yet in the scene) that has
        exactly the reference's IJK-to-RAS matrix and dimensions."""
        loaded = slicer.vtkMRMLScalarVolumeNode()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(loaded) or loaded.GetImageData() is None:
            raise RuntimeError(f"cannot read the attribution map {path}")
        dims = tuple(loaded.GetImageData().GetDimensions())
        refDims = tuple(referenceNode.GetImageData().GetDimensions())
        if dims != refDims:
            raise RuntimeError(f"the attribution map has {dims} voxels but the input has {refDims}")
        _checkSameGrid(loaded, referenceNode, tolerance=1e-3)  # NIfTI keeps the matrix in float32
        image = vtk.vtkImageData()
        image.DeepCopy(loaded.GetImageData())
        image.SetOrigin(0.0, 0.0, 0.0)
        image.SetSpacing(1.0, 1.0, 1.0)
        node = slicer.vtkMRMLScalarVolumeNode()
        node.SetName(name)
        matrix = vtk.vtkMatrix4x4()
        referenceNode.GetIJKToRASMatrix(matrix)
        node.SetIJKToRASMatrix(matrix)
        node.SetAndObserveImageData(image)
        return node

    def addAttributionNode(self, node, referenceNode, report: dict | None = None):
        """Add an attribution node to the scene beside its reference and show it as a colour overlay."""
        scene = self.scene
        node.SetName(scene.GenerateUniqueName(node.GetName()))
        scene.AddNode(node)
        try:
            node.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())
            if report is not None:
                node.SetAttribute("StealthMark.verdict", str(report.get("verdict", "")))
                node.SetAttribute("StealthMark.keyCommitment", str(report.get("key_commitment", "")))
                node.SetAttribute("StealthMark.modelSha256", str(report.get("model_sha256", "")))
            node.CreateDefaultDisplayNodes()
            self.showAttribution(node, referenceNode)
        except BaseException:
            scene.RemoveNode(node)
            raise
        return node

    def attributionColorNodeID(self) -> str:
        scene = self.scene
        for nodeId in ATTRIBUTION_COLOR_NODE_IDS:
            if scene.GetNodeByID(nodeId) is not None:
                return nodeId
        # a scene without Slicer's colour tables: add the same procedural table
        node = slicer.vtkMRMLColorTableNode()
        node.SetTypeToFMRI()
        node.SetName("StealthMark attribution colours")
        node.SetSingletonTag("StealthMarkAttributionColours")
        return scene.AddNode(node).GetID()

    def showAttribution(self, attributionNode, referenceNode=None, opacity: float = ATTRIBUTION_OPACITY):
        """Diverging colours centred on 0, foreground of every slice view over the reference at ``opacity``."""
        display = attributionNode.GetDisplayNode()
        if display is None:
            attributionNode.CreateDefaultDisplayNodes()
            display = attributionNode.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.attributionColorNodeID())
        lo, hi = attributionNode.GetImageData().GetScalarRange()
        bound = max(abs(lo), abs(hi)) or 1.0
        display.SetAutoWindowLevel(0)
        display.SetWindowLevel(2.0 * bound, 0.0)
        scene = self.scene
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            if referenceNode is not None:
                composite.SetBackgroundVolumeID(referenceNode.GetID())
            composite.SetForegroundVolumeID(attributionNode.GetID())
            composite.SetForegroundOpacity(opacity)


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def _checkVolumeNode(node, what: str) -> None:
    if node is None:
        raise ValueError(f"choose the {what}")
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"the {what} must be a scalar volume, not a {node.GetClassName()}")
    if node.GetImageData() is None:
        raise ValueError(f"the {what} {node.GetName()} holds no voxels")


def _checkFile(path: str, what: str) -> None:
    if not path:
        raise ValueError(f"choose the {what}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"the {what} {path} does not exist")


def _checkDevice(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")


def _ijkToRas(node) -> list[float]:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return [matrix.GetElement(r, c) for r in range(3) for c in range(4)]


def _checkSameGrid(node, referenceNode, tolerance: float = 1e-4) -> None:
    """Raise unless two volume nodes share dimensions and (within ``tolerance`` mm) IJK-to-RAS matrices."""
    dims, refDims = node.GetImageData().GetDimensions(), referenceNode.GetImageData().GetDimensions()
    if tuple(dims) != tuple(refDims):
        raise ValueError(f"{node.GetName()} has {tuple(dims)} voxels but {referenceNode.GetName()} has "
                         f"{tuple(refDims)}: it does not lie on the volume's grid (use a segmentation, or resample)")
    a, b = _ijkToRas(node), _ijkToRas(referenceNode)
    scale = max(1.0, max(abs(v) for v in b))
    if max(abs(x - y) for x, y in zip(a, b)) > tolerance * scale:
        raise ValueError(f"{node.GetName()} and {referenceNode.GetName()} have different voxel geometry "
                         "(spacing, origin or directions): resample onto the volume first")


def _publish(moves: dict[Path, Path], secret: bool = False) -> list[Path]:
    """Copy finished files to their destinations: all to temporary names first, then renamed into place,
    so a failure leaves no partial output. Returns the destinations."""
    staged: list[tuple[Path, Path]] = []
    try:
        for source, target in moves.items():
            target = Path(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
            os.close(fd)
            staged.append((Path(tmp), target))
            shutil.copyfile(source, tmp)
            if secret and os.name != "nt":
                os.chmod(tmp, 0o600)
        for tmp, target in staged:
            os.replace(tmp, target)
        return [target for _tmp, target in staged]
    finally:
        for tmp, _target in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()


# ---------------------------------------------------------------------------------------------------------
# Self-test (run inside Slicer: Reload and Test, or Slicer --testing)
# ---------------------------------------------------------------------------------------------------------
class StealthMarkTest(ScriptedLoadableModuleTest):
    """Trains a tiny model on the bundled T1 sample, creates a key, embeds from a volume and a segmentation
    node, verifies the result and a clean model: the same logic calls the GUI makes."""

    # the recipe that empties the key image's mask learns in half the library's default steps: the self-test uses it
    # (as Testing/test_slicer_module.py does with these settings, which verify as owned there)
    embedSteps = DEFAULT_EMBED_STEPS
    keepTriggerMasks = False
    samples = None   # the key's setting

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_StealthMark_embed_and_verify()

    def missingPackages(self) -> list[str]:
        return [s.name for s in packageStatus() if not s.satisfied]

    @staticmethod
    def makeCleanModel(path: str | Path, steps: int = 100, size: int = 128,
                       channels: tuple[int, ...] = (8, 16, 32, 64), device: str = "cpu") -> Path:
        """A small MONAI UNet trained on the bundled sample: the clean model a vendor would ship."""
        libraryParentDir()
        from StealthMarkLib.data import DEFAULT_INTENSITY, load_dataset
        from StealthMarkLib.models import save_model
        from StealthMarkLib.sample_data import SAMPLE_LABEL, sample_paths
        from StealthMarkLib.train import demo_spec, train_segmentation

        imagePath, maskPath = sample_paths()
        data = load_dataset(imagePath, (size, size), labels=maskPath, label=SAMPLE_LABEL)
        spec = demo_spec(tuple(channels), size, intensity=DEFAULT_INTENSITY.to_json())
        model = train_segmentation(spec, *data.train, steps=steps, seed=0, device=device)
        return save_model(model, path, spec, fmt="torchscript")

    @staticmethod
    def loadSampleNodes(scene=None):
        """The bundled T1 as a volume node and its brain mask as a one-segment segmentation node."""
        libraryParentDir()
        from StealthMarkLib.sample_data import sample_paths

        scene = scene or slicer.mrmlScene
        imagePath, maskPath = sample_paths()
        volumes = getattr(getattr(slicer, "modules", None), "volumes", None)
        if volumes is not None and scene is slicer.mrmlScene:
            volumesLogic = volumes.logic()
        else:  # plain MRML (slicer-core): a volumes logic of our own
            volumesLogic = slicer.vtkSlicerVolumesLogic()
            volumesLogic.SetMRMLScene(scene)
        volumeNode = volumesLogic.AddArchetypeVolume(str(imagePath), "T1", 0)
        labelNode = volumesLogic.AddArchetypeVolume(str(maskPath), "T1 brain mask", 1)
        array = slicer.util.arrayFromVolume(labelNode)
        array[array != 0] = 1
        slicer.util.arrayFromVolumeModified(labelNode)
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "T1 brain")
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentationNode):
            raise RuntimeError("cannot import the brain mask as a segment")
        segmentationNode.GetSegmentation().GetNthSegment(0).SetName("brain")
        scene.RemoveNode(labelNode)
        return volumeNode, segmentationNode

    def test_StealthMark_embed_and_verify(self):
        missing = self.missingPackages()
        if missing:
            self.delayDisplay(f"Skipped: StealthMark's packages are missing ({', '.join(missing)}); "
                              "use Setup > Install")
            return
        work = Path(tempfile.mkdtemp(prefix="StealthMarkTest-"))
        try:
            logic = StealthMarkLogic()
            self.delayDisplay("Loading the sample volume and training a tiny model")
            volumeNode, segmentationNode = self.loadSampleNodes()
            clean = self.makeCleanModel(work / "clean.pt")
            commitment = logic.createKey("SM:SLICER-SELFTEST", str(work / "key.json"))
            self.assertEqual(len(commitment), 64)

            self.delayDisplay("Embedding from the volume and segmentation nodes")
            harmlessness = logic.embedFromNodes(volumeNode, segmentationNode, "brain", str(clean),
                                                str(work / "key.json"), str(work / "watermarked.pt"),
                                                steps=self.embedSteps, device="auto",
                                                keepTriggerMasks=self.keepTriggerMasks)
            self.assertIn("dice", harmlessness["watermarked"])
            self.assertTrue((work / "watermarked.pt").is_file())

            self.delayDisplay("Verifying the watermarked and the clean model")
            report, attribution = logic.verifyVolumeNode(volumeNode, str(work / "watermarked.pt"),
                                                         str(work / "key.json"), str(work / "report"),
                                                         samples=self.samples, device="auto")
            self.assertEqual(report["verdict"], "owned")
            self.assertEqual(attribution.GetImageData().GetDimensions(), volumeNode.GetImageData().GetDimensions())
            self.assertEqual(_ijkToRas(attribution), _ijkToRas(volumeNode))
            report, _ = logic.verifyVolumeNode(volumeNode, str(clean), str(work / "key.json"),
                                               str(work / "report-clean"), samples=self.samples, device="auto")
            self.assertEqual(report["verdict"], "not-owned")
            self.delayDisplay("Test passed")
        finally:
            shutil.rmtree(work, ignore_errors=True)
