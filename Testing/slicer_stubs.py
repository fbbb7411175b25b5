"""Stand-ins for the parts of 3D Slicer that the PyPI package ``slicer-core`` does not have.

``slicer-core`` gives real MRML (scenes, volume, labelmap and segmentation nodes, storage nodes, the volumes
and segmentations logic, ``slicer.util`` array helpers). It has no Qt: no ``qt``, ``ctk``, ``slicer.app``,
``slicer.modules``, ``slicer.ScriptedLoadableModule`` base classes or ``slicer.util`` dialogs and UI loading.
:func:`install` provides exactly those, and nothing else, so that ``StealthMark/StealthMark.py`` imports and
its widget can be driven in tests. The fake widgets are built from the real ``.ui`` file, so a widget name the
code uses but the ``.ui`` lacks fails the same way it would in Slicer.
"""

from __future__ import annotations

import sys
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import slicer
import slicer.util

MODULE_DIR = Path(__file__).resolve().parent.parent / "StealthMark"


# ---------------------------------------------------------------------------------------------------------
# Signals and widgets
# ---------------------------------------------------------------------------------------------------------
class _Signal:
    """``widget.clicked.connect(slot)`` style access to a widget's signal."""

    def __init__(self, owner: "FakeWidget", name: str):
        self.owner, self.name = owner, name

    def connect(self, slot: Callable) -> None:
        self.owner.connect(self.name, slot)

    def emit(self, *args: Any) -> None:
        self.owner.emit(self.name, *args)


class FakeWidget:
    """A Qt widget reduced to its state and its signals (connect by signature or by attribute)."""

    SIGNALS = ("clicked", "toggled", "textChanged", "currentPathChanged", "valueChanged", "currentIndexChanged",
               "currentNodeChanged", "timeout", "contentsCollapsed")

    def __init__(self, className: str = "QWidget", name: str = "", props: dict | None = None):
        self.className = className
        self.objectName = name
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self.text = ""
        self._slots: dict[str, list[Callable]] = {}
        self._blocked = False
        for key, value in (props or {}).items():
            setattr(self, key, value)

    def __getattr__(self, name: str) -> Any:
        if name in FakeWidget.SIGNALS:
            return _Signal(self, name)
        raise AttributeError(f"{self.className} {self.objectName!r} has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<Fake {self.className} {self.objectName}>"

    # signals
    def connect(self, signature: str, slot: Callable) -> None:
        self._slots.setdefault(signature.split("(")[0], []).append(slot)

    def emit(self, name: str, *args: Any) -> None:
        if self._blocked:
            return
        for slot in list(self._slots.get(name, [])):
            slot(*args)

    def blockSignals(self, block: bool) -> bool:
        previous, self._blocked = self._blocked, bool(block)
        return previous

    # QWidget
    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def setEnabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def setToolTip(self, text: str) -> None:
        self.toolTip = text

    def setText(self, text: str) -> None:
        self.text = str(text)

    def setMRMLScene(self, scene: Any) -> None:
        self.mrmlScene = scene


class QPushButton(FakeWidget):
    def click(self) -> None:
        if self.enabled:
            self.emit("clicked", False)


class QLineEdit(FakeWidget):
    def setText(self, text: str) -> None:
        changed = text != self.text
        self.text = str(text)
        if changed:
            self.emit("textChanged", self.text)


class ctkPathLineEdit(FakeWidget):
    def __init__(self, *args: Any, **kwargs: Any):
        self.currentPath = ""
        self.filters = 0
        self.nameFilters: list[str] = []
        super().__init__(*args, **kwargs)

    def setCurrentPath(self, path: str) -> None:
        changed = path != self.currentPath
        self.currentPath = str(path)
        if changed:
            self.emit("currentPathChanged", self.currentPath)


class QSpinBox(FakeWidget):
    def __init__(self, *args: Any, **kwargs: Any):
        self.minimum, self.maximum, self.value = 0, 99, 0
        super().__init__(*args, **kwargs)

    def setValue(self, value: int) -> None:
        value = min(max(int(value), self.minimum), self.maximum)
        changed = value != self.value
        self.value = value
        if changed:
            self.emit("valueChanged", value)


class QComboBox(FakeWidget):
    def __init__(self, *args: Any, **kwargs: Any):
        self.items: list[tuple[str, Any]] = []
        self.currentIndex = -1
        super().__init__(*args, **kwargs)

    @property
    def currentText(self) -> str:
        return self.items[self.currentIndex][0] if 0 <= self.currentIndex < len(self.items) else ""

    def addItem(self, text: str, data: Any = None) -> None:
        self.items.append((str(text), data))
        if self.currentIndex < 0:
            self.setCurrentIndex(0)

    def clear(self) -> None:
        self.items = []
        self.setCurrentIndex(-1)

    def count(self) -> int:
        return len(self.items)

    def itemText(self, index: int) -> str:
        return self.items[index][0]

    def itemData(self, index: int) -> Any:
        return self.items[index][1]

    def findText(self, text: str) -> int:
        return next((i for i, (t, _d) in enumerate(self.items) if t == text), -1)

    def setCurrentIndex(self, index: int) -> None:
        index = int(index) if -1 <= int(index) < len(self.items) else -1
        changed = index != self.currentIndex
        self.currentIndex = index
        if changed:
            self.emit("currentIndexChanged", index)


class qMRMLNodeComboBox(FakeWidget):
    def __init__(self, *args: Any, **kwargs: Any):
        self._node = None
        self.nodeTypes: list[str] = []
        super().__init__(*args, **kwargs)

    def currentNode(self) -> Any:
        return self._node

    def setCurrentNode(self, node: Any) -> None:
        if node is not None and self.nodeTypes and not any(node.IsA(t) for t in self.nodeTypes):
            raise TypeError(f"{self.objectName} does not accept {node.GetClassName()}")
        changed = node is not self._node
        self._node = node
        if changed:
            self.emit("currentNodeChanged", node)


class QLabel(FakeWidget):
    def __init__(self, *args: Any, **kwargs: Any):
        self._pixmap = None
        super().__init__(*args, **kwargs)

    def setPixmap(self, pixmap: Any) -> None:
        self._pixmap = pixmap

    def pixmap(self) -> Any:
        return self._pixmap

    def clear(self) -> None:
        self.text, self._pixmap = "", None


class QProgressBar(FakeWidget):
    def __init__(self, *args: Any, **kwargs: Any):
        self.minimum, self.maximum, self.value = 0, 100, 0
        super().__init__(*args, **kwargs)

    def setRange(self, lo: int, hi: int) -> None:
        self.minimum, self.maximum = int(lo), int(hi)

    def setValue(self, value: int) -> None:
        self.value = int(value)


class QPlainTextEdit(FakeWidget):
    def __init__(self, *args: Any, **kwargs: Any):
        self.lines: list[str] = []
        super().__init__(*args, **kwargs)

    def appendPlainText(self, text: str) -> None:
        self.lines.append(str(text))

    def toPlainText(self) -> str:
        return "\n".join(self.lines)


class QCheckBox(FakeWidget):
    def __init__(self, *args: Any, **kwargs: Any):
        self.checked = False
        super().__init__(*args, **kwargs)

    def setChecked(self, checked: bool) -> None:
        changed = bool(checked) != self.checked
        self.checked = bool(checked)
        if changed:
            self.emit("toggled", self.checked)


WIDGET_CLASSES = {cls.__name__: cls for cls in (QPushButton, QLineEdit, ctkPathLineEdit, QSpinBox, QComboBox,
                                               qMRMLNodeComboBox, QLabel, QProgressBar, QPlainTextEdit, QCheckBox)}


def _property(element: ET.Element) -> Any:
    value = list(element)[0]
    if value.tag in ("string", "enum", "set", "cstring"):
        return value.text or ""
    if value.tag == "number":
        return int(value.text)
    if value.tag == "bool":
        return value.text == "true"
    if value.tag == "stringlist":
        return [s.text or "" for s in value]
    return None


def load_ui(path: str | Path) -> FakeWidget:
    """Fake widgets for every named widget of a Qt Designer file; the top one holds them in ``children``."""
    root = ET.parse(path).getroot()
    top_element = root.find("widget")
    widgets: dict[str, FakeWidget] = {}
    for element in top_element.iter("widget"):
        props = {p.get("name"): _property(p) for p in element.findall("property")}
        props = {k: v for k, v in props.items() if v is not None and k not in ("geometry",)}
        cls = WIDGET_CLASSES.get(element.get("class"), FakeWidget)
        widget = cls(element.get("class"), element.get("name"))
        for key, value in props.items():
            setattr(widget, key, value)
        if isinstance(widget, QComboBox):
            for item in element.findall("item"):
                widget.addItem(_property(item.find("property")))
        widgets[element.get("name")] = widget
    top = widgets[top_element.get("name")]
    top.children = widgets
    return top


def child_widget_variables(widget: FakeWidget) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{k: v for k, v in widget.children.items() if k != widget.objectName})


# ---------------------------------------------------------------------------------------------------------
# qt and ctk
# ---------------------------------------------------------------------------------------------------------
class QTimer(FakeWidget):
    """A timer that never fires on its own: tests call :meth:`fire` (or :func:`run_timers`)."""

    instances: list["QTimer"] = []

    def __init__(self, *args: Any) -> None:
        super().__init__("QTimer", "timer")
        self.interval = 0
        self.active = False
        QTimer.instances.append(self)

    def setInterval(self, ms: int) -> None:
        self.interval = int(ms)

    def start(self, *args: Any) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:
        return self.active

    def fire(self) -> None:
        if self.active:
            self.emit("timeout")

    @staticmethod
    def singleShot(ms: int, slot: Callable) -> None:
        slot()


class QPixmap:
    def __init__(self, path: str = ""):
        self.path = str(path)
        self.size = None
        try:
            from PIL import Image

            with Image.open(self.path) as im:
                self.size = im.size
        except Exception:
            self.size = None

    def isNull(self) -> bool:
        return self.size is None

    def scaled(self, w: int, h: int, *args: Any) -> "QPixmap":
        out = QPixmap.__new__(QPixmap)
        out.path, out.size = self.path, (w, h) if self.size else None
        return out


class QUrl:
    def __init__(self, url: str):
        self.url = url

    @staticmethod
    def fromLocalFile(path: str) -> "QUrl":
        return QUrl("file://" + Path(path).as_posix())

    def toString(self) -> str:
        return self.url


class QFileDialog:
    next_save_file_name = ""

    @staticmethod
    def getSaveFileName(*args: Any) -> str:
        return QFileDialog.next_save_file_name


class QMessageBox:
    Ok, Cancel, Yes, No = 1, 2, 4, 8


def _make_qt() -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.QTimer = QTimer
    qt.QPixmap = QPixmap
    qt.QUrl = QUrl
    qt.QFileDialog = QFileDialog
    qt.QMessageBox = QMessageBox
    qt.QWidget = FakeWidget
    qt.Qt = types.SimpleNamespace(KeepAspectRatio=1, FastTransformation=0, SmoothTransformation=1)
    return qt


def _make_ctk() -> types.ModuleType:
    ctk = types.ModuleType("ctk")

    class _PathLineEdit:
        Dirs, Drives, Files, NoDot, NoDotDot, Readable, Writable, Executable = 1, 4, 2, 0x2000, 0x4000, 0x10, 0x20, 0x40

    ctk.ctkPathLineEdit = _PathLineEdit
    ctk.ctkCollapsibleButton = FakeWidget
    return ctk


# ---------------------------------------------------------------------------------------------------------
# Slicer's GUI side
# ---------------------------------------------------------------------------------------------------------
class FakeModuleParent(types.SimpleNamespace):
    """What ScriptedLoadableModule and ...Widget get as ``parent`` (a qSlicerScriptedLoadableModule... in Slicer)."""

    def __init__(self) -> None:
        super().__init__(title="", categories=[], dependencies=[], contributors=[], helpText="",
                         acknowledgementText="", isEntered=False)


class _Layout:
    def __init__(self) -> None:
        self.widgets: list[Any] = []

    def addWidget(self, widget: Any) -> None:
        self.widgets.append(widget)

    def addStretch(self, *args: Any) -> None:
        pass


class ScriptedLoadableModule:
    def __init__(self, parent: Any):
        self.parent = parent
        self.moduleName = type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent: Any = None):
        self.parent = parent if parent is not None else FakeModuleParent()
        self.moduleName = type(self).__name__[: -len("Widget")]
        self.layout = _Layout()
        self.reloaded = False

    def setup(self) -> None:
        pass

    def resourcePath(self, filename: str) -> str:
        module_file = Path(sys.modules[type(self).__module__].__file__)
        return str(module_file.parent / "Resources" / filename)

    def onReload(self) -> None:
        self.reloaded = True


class ScriptedLoadableModuleLogic:
    def __init__(self, parent: Any = None):
        self.moduleName = type(self).__name__[: -len("Logic")]


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 0) -> None:
        print(message)


class _CommandOptions:
    testingEnabled = False


class FakeApp:
    """``slicer.app``: only what the module asks of it."""

    def __init__(self, temporary_path: str):
        self.temporaryPath = temporary_path
        self.options = _CommandOptions()

    def commandOptions(self) -> _CommandOptions:
        return self.options

    def processEvents(self) -> None:
        pass


class Dialogs:
    """Records the module's dialogs; ``confirm`` is what the user answers."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str | None]] = []
        self.confirmations: list[str] = []
        self.confirm = True

    def errorDisplay(self, text: str, windowTitle: str | None = None, detailedText: str | None = None, **kw: Any):
        self.errors.append((text, detailedText))

    def confirmOkCancelDisplay(self, text: str, windowTitle: str | None = None, **kw: Any) -> bool:
        self.confirmations.append(text)
        return self.confirm


class _WaitCursor:
    def __enter__(self) -> "_WaitCursor":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


dialogs = Dialogs()


def install(temporary_path: str) -> Dialogs:
    """Put the stand-ins in place (idempotent); return the dialog recorder."""
    sys.modules["qt"] = _make_qt()
    sys.modules["ctk"] = _make_ctk()
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    slicer.ScriptedLoadableModule = slm
    slicer.app = FakeApp(temporary_path)
    slicer.modules = types.SimpleNamespace()
    slicer.util.loadUI = load_ui
    slicer.util.childWidgetVariables = child_widget_variables
    slicer.util.errorDisplay = dialogs.errorDisplay
    slicer.util.confirmOkCancelDisplay = dialogs.confirmOkCancelDisplay
    slicer.util.delayDisplay = lambda message, msec=0: print(message)
    slicer.util.WaitCursor = _WaitCursor
    dialogs.errors.clear()
    dialogs.confirmations.clear()
    dialogs.confirm = True
    return dialogs


def import_module() -> types.ModuleType:
    """Import (or return) the StealthMark module file with the stand-ins in place."""
    if "StealthMark" in sys.modules:
        return sys.modules["StealthMark"]
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    import StealthMark

    return StealthMark


def run_timers(predicate: Callable[[], bool], timeout: float = 120.0, interval: float = 0.05) -> None:
    """Fire the active fake timers until ``predicate()`` holds (what Qt's event loop would do)."""
    import time

    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("the condition did not hold in time")
        for timer in list(QTimer.instances):
            timer.fire()
        time.sleep(interval)
