"""The 3D Slicer extension: its build files, its module file, its logic on real MRML, its GUI on fake Qt.

Real components throughout: MRML scenes and nodes from the PyPI package ``slicer-core`` (volumes loaded from
NIfTI and from a DICOM series through ``vtkSlicerVolumesLogic``, segmentations through
``vtkSlicerSegmentationsModuleLogic``), real TorchScript models, and the real ``stealthmark`` command in a
child process. Only Qt, ctk and Slicer's GUI base classes are stand-ins (``slicer_stubs.py``). Runner unit
tests drive tiny ``python -c`` children to check progress parsing, errors and killing a process tree.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the PyPI package slicer-core is needed for the Slicer tests")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_stubs  # noqa: E402

import vtk  # noqa: E402  (the vtk that slicer-core pins)

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "StealthMark"
MODULE_FILE = MODULE_DIR / "StealthMark.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "StealthMark.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "StealthMark.png"
LIB_DIR = ROOT / "StealthMarkLib"
PY = sys.executable

# A CI-size setting: the demo's MONAI UNet (101k parameters) at 128 px (QR cells of 6 px), embedded with the
# recipe that empties the trigger images' masks ("Keep the key image's mask" cleared; secret tile among decoy
# tiles), which learns in half the steps of the library's default.
IMAGE_SIZE = 128
CHANNELS = (8, 16, 32, 64)
CLEAN_STEPS = 200
EMBED_STEPS = 1800
PAYLOAD = "SM:SLICER-TEST"


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def temp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("slicer-temp")


@pytest.fixture(scope="module")
def sm(temp_root):
    """The StealthMark module file, imported with the Qt stand-ins; one BLAS/OpenMP thread for children."""
    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # 2 shared cores: no oversubscription
    slicer_stubs.install(str(temp_root))
    module = slicer_stubs.import_module()
    yield module
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def dialogs(sm, temp_root):
    return slicer_stubs.install(str(temp_root))


def new_scene():
    """A scene set up as Slicer sets one up: colour tables from the colour logic, slice composite nodes."""
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    scene._colorLogic = colors  # keep it alive with the scene
    for name in ("Red", "Yellow", "Green"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
    slicer.mrmlScene = scene
    return scene


@pytest.fixture
def scene(sm):
    return new_scene()


def load_volume(scene, path, name, labelmap=False):
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    node = logic.AddArchetypeVolume(str(path), name, 1 if labelmap else 0)
    assert node is not None, f"slicer-core could not load {path}"
    return node


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def segmentation_from_labelmap(scene, labelNode, referenceNode, name="brain"):
    array = slicer.util.arrayFromVolume(labelNode)
    array[array != 0] = 1
    slicer.util.arrayFromVolumeModified(labelNode)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(referenceNode)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, seg)
    seg.GetSegmentation().GetNthSegment(0).SetName(name)
    return seg


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    """The bundled T1 and brain mask re-written with an oblique, shifted geometry, plus the T1 as DICOM."""
    from StealthMarkLib.dicom_export import write_dicom_series
    from StealthMarkLib.sample_data import sample_paths
    from StealthMarkLib.volume import Volume, read_volume, write_volume_like

    out = tmp_path_factory.mktemp("sample")
    t1_path, mask_path = sample_paths()
    t1, mask = read_volume(t1_path), read_volume(mask_path)
    a = np.deg2rad(20.0)
    rotation = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    direction = (rotation @ np.asarray(t1.direction).reshape(3, 3)).ravel()
    geometry = dict(spacing=t1.spacing, origin=(12.5, -30.25, 7.0), direction=tuple(direction))
    image = Volume(t1.array, **geometry)
    labels = Volume(mask.array, **geometry)
    files = {"nifti": out / "t1.nii.gz", "mask": out / "t1_mask.nii.gz", "dicom": out / "dicom"}
    write_volume_like(image.array, image, files["nifti"])
    write_volume_like(labels.array, labels, files["mask"])
    files["dicom_files"] = write_dicom_series(image, files["dicom"], modality="MR")
    return files


@pytest.fixture(scope="module")
def clean_model(sm, tmp_path_factory):
    """A CI-size clean model trained on the sample by the self-test's helper (in this process, one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sm.StealthMarkTest.makeCleanModel(tmp_path_factory.mktemp("models") / "clean.pt", steps=CLEAN_STEPS,
                                                 size=IMAGE_SIZE, channels=CHANNELS)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def key_file(sm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("key")
    fresh = sm.StealthMarkLogic(scene=slicer.vtkMRMLScene()).createKey(PAYLOAD, str(folder / "fresh.json"))
    from StealthMarkLib.key import create_key, load_key

    assert load_key(folder / "fresh.json").commitment == fresh
    # the models are embedded with a fixed key so that CI is deterministic (random keys: benchmarks/)
    key = create_key(PAYLOAD, seed=20261128)
    path = key.save(folder / "key.json")
    return path, key.commitment


@pytest.fixture(scope="module")
def embedded(sm, sample_files, clean_model, key_file, tmp_path_factory):
    """Embed from a volume node plus a segmentation node, through the logic (the real command)."""
    scene = new_scene()
    volume = load_volume(scene, sample_files["nifti"], "T1")
    labels = load_volume(scene, sample_files["mask"], "mask", labelmap=True)
    segmentation = segmentation_from_labelmap(scene, labels, volume)
    scene.RemoveNode(labels)
    before = node_ids(scene)
    out = tmp_path_factory.mktemp("embedded") / "watermarked.pt"
    events = []
    logic = sm.StealthMarkLogic(scene=scene)
    started = time.monotonic()
    harmlessness = logic.embedFromNodes(volume, segmentation, "brain", str(clean_model), str(key_file[0]),
                                        str(out), steps=EMBED_STEPS, device="cpu", progressCallback=events.append,
                                        keepTriggerMasks=False)
    return dict(path=out, harmlessness=harmlessness, events=events, before=before, after=node_ids(scene),
                seconds=time.monotonic() - started)


def leftover_work_dirs(temp_root) -> list[Path]:
    return sorted(Path(temp_root).glob("StealthMark-*"))


# ---------------------------------------------------------------------------------------------------------
# Build files, metadata, resources (static)
# ---------------------------------------------------------------------------------------------------------
def cmake_set_values(text: str) -> dict[str, str]:
    """``set(NAME "value")`` / ``set(NAME value)`` pairs of a CMakeLists.txt (strings may span lines)."""
    values = {}
    for m in re.finditer(r'set\(\s*(\w+)\s+(?:"((?:[^"\\]|\\.)*)"|([^)\s]+))\s*\)', text, re.S):
        values[m.group(1)] = m.group(2) if m.group(2) is not None else m.group(3)
    return values


def s4ext_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        values[key] = value.strip()
    return values


def cmake_list(text: str, variable: str) -> list[str]:
    m = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert m, f"{variable} is not set"
    return m.group(1).split()


def test_cmake_metadata_and_s4ext_agree():
    cmake = cmake_set_values((ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    s4ext = s4ext_values(ROOT / "StealthMark.s4ext")
    pairs = {"EXTENSION_HOMEPAGE": "homepage", "EXTENSION_CATEGORY": "category",
             "EXTENSION_CONTRIBUTORS": "contributors", "EXTENSION_DESCRIPTION": "description",
             "EXTENSION_ICONURL": "iconurl", "EXTENSION_SCREENSHOTURLS": "screenshoturls",
             "EXTENSION_DEPENDS": "depends", "EXTENSION_STATUS": "status"}
    for cmake_name, s4_name in pairs.items():
        assert cmake.get(cmake_name), f"{cmake_name} is empty in CMakeLists.txt"
        assert cmake[cmake_name] == s4ext.get(s4_name), f"{cmake_name} and .s4ext '{s4_name}' differ"
    assert cmake["EXTENSION_CATEGORY"] == "Segmentation"
    assert cmake["EXTENSION_DEPENDS"].split() == ["PyTorch"]   # only what the module uses
    assert s4ext["scm"] == "git" and s4ext["build_subdirectory"] == "." and s4ext["enabled"] == "1"
    assert s4ext["scmurl"].rstrip("/").removesuffix(".git") == cmake["EXTENSION_HOMEPAGE"].rstrip("/")
    assert s4ext["scmrevision"]
    assert s4ext["iconurl"].endswith("StealthMark/Resources/Icons/StealthMark.png")


def test_top_level_cmake_builds_an_extension():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\(\s*StealthMark\s*\)", text)
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(StealthMarkLib)",
             "add_subdirectory(StealthMark)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
             "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)


def test_module_cmake_has_generic_tests_and_lists_its_files():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert re.search(r"set\(\s*MODULE_NAME\s+StealthMark\s*\)", text)
    scripts = [s.replace("${MODULE_NAME}", "StealthMark") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    resources = [s.replace("${MODULE_NAME}", "StealthMark") for s in cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    assert scripts == ["StealthMark.py"]
    assert sorted(resources) == ["Resources/Icons/StealthMark.png", "Resources/UI/StealthMark.ui"]
    for rel in scripts + resources:
        assert (MODULE_DIR / rel).is_file(), rel
    # Slicer loads every top-level .py of a module folder as a module: only StealthMark.py may be there
    assert sorted(p.name for p in MODULE_DIR.glob("*.py")) == ["StealthMark.py"]


def test_library_cmake_lists_every_python_and_data_file():
    text = (LIB_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "WITH_SUBDIR" in text and re.search(r"set\(\s*MODULE_NAME\s+StealthMarkLib\s*\)", text)
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk = sorted(p.name for p in LIB_DIR.glob("*.py"))
    assert sorted(scripts) == on_disk, "StealthMarkLib/CMakeLists.txt must list exactly the package's .py files"
    data = sorted(str(p.relative_to(LIB_DIR)).replace(os.sep, "/") for p in (LIB_DIR / "data").rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)
    assert sorted(resources) == data, "StealthMarkLib/CMakeLists.txt must list exactly the package data files"


def test_module_metadata_matches_the_extension(sm):
    parent = slicer_stubs.FakeModuleParent()
    sm.StealthMark(parent)
    cmake = cmake_set_values((ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert parent.title == "StealthMark"
    assert parent.categories == [cmake["EXTENSION_CATEGORY"]]
    assert parent.contributors == [cmake["EXTENSION_CONTRIBUTORS"]]
    assert parent.helpText.strip() and parent.acknowledgementText.strip()


def test_icon_is_a_128_pixel_png_drawn_by_its_script():
    from PIL import Image

    with Image.open(ICON_FILE) as im:
        assert im.format == "PNG" and im.size == (128, 128)
        stored = np.asarray(im.convert("RGBA"))
    sys.path.insert(0, str(ICON_FILE.parent))
    try:
        import make_icon
    finally:
        sys.path.remove(str(ICON_FILE.parent))
    drawn = np.asarray(make_icon.draw().convert("RGBA"))
    assert np.abs(drawn.astype(int) - stored.astype(int)).max() <= 2


def test_ui_file_is_a_valid_designer_file():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.find("class").text == "StealthMark"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "StealthMark"
    widgets = list(top.iter("widget"))
    names = [w.get("name") for w in widgets]
    assert len(names) == len(set(names)), "widget names must be unique"
    sections = {w.findtext("property[@name='text']/string") for w in widgets
                if w.get("class") == "ctkCollapsibleButton"}
    assert {"Setup", "Verify", "Embed"} <= sections
    for form in root.iter("layout"):   # a QFormLayout has a label and a field column, one item per cell
        if form.get("class") == "QFormLayout":
            cells = [(i.get("row"), i.get("column")) for i in form.findall("item")]
            assert {c for _r, c in cells} <= {"0", "1"} and len(cells) == len(set(cells)), form.get("name")
    classes = {w.get("class") for w in widgets}
    assert {"qMRMLNodeComboBox", "ctkPathLineEdit"} <= classes
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    assert {c for c in classes if not c.startswith("Q")} <= declared
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert receivers == {w.get("name") for w in widgets if w.get("class") == "qMRMLNodeComboBox"}


def test_every_widget_name_the_code_uses_exists_in_the_ui(sm):
    ui_names = {w.get("name") for w in ET.parse(UI_FILE).getroot().iter("widget")}
    source = MODULE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    suffixes = ("Label", "Button", "LineEdit", "SpinBox", "ComboBox", "Selector", "TextEdit", "Bar", "GroupBox")
    for node in ast.walk(ast.parse(source)):  # names reached through getattr(self.ui, name)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[a-z]\w*", node.value) \
                and node.value.endswith(suffixes):
            used.add(node.value)
    used |= {widget for _param, widget, _kind in sm.PARAMETER_WIDGETS}
    assert used, "the code uses no widget?"
    assert sorted(used - ui_names) == []


def test_requirements_match_the_library_package():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    module = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    requirements = next(ast.literal_eval(n.value) for n in module.body
                        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "REQUIREMENTS")
    assert list(requirements) == pyproject["project"]["dependencies"]


def test_default_steps_match_the_library():
    import StealthMarkLib

    module = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    steps = next(ast.literal_eval(n.value) for n in module.body
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DEFAULT_EMBED_STEPS")
    assert steps == StealthMarkLib.DEFAULT_EMBED_STEPS
    keep = next(ast.literal_eval(n.value) for n in module.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "KEEP_MASKS_EMBED_STEPS")
    assert keep == StealthMarkLib.KEEP_MASKS_EMBED_STEPS
    ui = UI_FILE.read_text(encoding="utf-8")
    spin = ui[ui.index('name="embedStepsSpinBox"'):]
    assert f"<number>{keep}</number>" in spin[:spin.index("</widget>")]          # the default recipe's steps
    box = ui[ui.index('name="embedKeepMasksCheckBox"'):]
    assert "<bool>true</bool>" in box[:box.index("</widget>")]                  # ticked: the library's default
    from StealthMarkLib.embed import EmbedConfig
    assert EmbedConfig().keep_trigger_masks is True


def test_default_batch_size_matches_the_library():
    from StealthMarkLib.embed import EmbedConfig, batch_settings

    module = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    batch = next(ast.literal_eval(n.value) for n in module.body
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DEFAULT_EMBED_BATCH")
    defaults = EmbedConfig()
    assert {k: getattr(defaults, k) for k in batch_settings(batch)} == batch_settings(batch)
    ui = UI_FILE.read_text(encoding="utf-8")
    spin = ui[ui.index('name="embedBatchSizeSpinBox"'):]
    assert f"<number>{batch}</number>" in spin[:spin.index("</widget>")]


def test_library_never_imports_slicer_qt_or_vtk():
    pattern = re.compile(r"^\s*(?:import|from)\s+(slicer|qt|ctk|vtk)\b", re.M)
    offenders = [p.name for p in LIB_DIR.glob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_module_file_imports_only_what_slicer_provides():
    """Top-level imports: the standard library and Slicer's own modules; StealthMarkLib only lazily."""
    allowed = set(sys.stdlib_module_names) | {"ctk", "qt", "slicer", "vtk"}
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            continue
        assert set(names) <= allowed | {"__future__"}, names


def test_on_reload_reloads_the_library(sm):
    """In a fresh interpreter: onReload calls importlib.reload on every loaded StealthMarkLib module."""
    script = textwrap.dedent(f"""
        import sys, tempfile, importlib
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        import slicer_stubs
        slicer_stubs.install(tempfile.mkdtemp())
        sm = slicer_stubs.import_module()
        import StealthMarkLib.key, StealthMarkLib.errors
        old_error, old_key = StealthMarkLib.errors.StealthMarkError, StealthMarkLib.key.load_key
        widget = sm.StealthMarkWidget()
        widget.onReload()
        assert widget.reloaded
        assert StealthMarkLib.errors.StealthMarkError is not old_error
        assert StealthMarkLib.key.load_key is not old_key
        # the key module was reloaded after errors, so it uses the new error classes
        assert StealthMarkLib.key.KeyFileError is StealthMarkLib.errors.KeyFileError
        print("ok")
    """)
    done = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------------------------------------
# Parameter node
# ---------------------------------------------------------------------------------------------------------
def test_parameter_node_survives_scene_save_and_load(sm, scene, sample_files, tmp_path):
    volume = load_volume(scene, sample_files["nifti"], "T1")
    dicom = load_volume(scene, sample_files["dicom_files"][0], "T1 DICOM")
    labels = load_volume(scene, sample_files["mask"], "mask", labelmap=True)
    logic = sm.StealthMarkLogic(scene=scene)
    p = logic.getParameterNode()
    assert logic.getParameterNode() == p  # a singleton
    values = dict(verifyVolume=dicom, verifyModelPath="/models/vendor model (v2).pt", verifyKeyPath="/keys/k.json",
                  verifySlices="10:40:2", verifySamples=750, verifySeed=12, verifyNullKeys=7, verifyDevice="cpu",
                  verifyOutputDir="/reports/é", embedVolume=volume, embedLabels=labels, embedSegment="5",
                  embedModelPath="/m/clean.ts", embedKeyPath="/k/new.json", embedPayload="SM:ACME 0001",
                  embedOutputPath="/m/wm.ts", embedSteps=450, embedKeepMasks=True, embedDevice="cuda",
                  embedBatchSize=3)
    for name, value in values.items():
        setattr(p, name, value)
    assert set(values) | {"verifyAttribution"} == set(sm.StealthMarkParameters.names())

    mrml = tmp_path / "scene.mrml"
    scene.SetURL(str(mrml))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(mrml))
    assert loaded.Connect()
    p2 = sm.StealthMarkLogic(scene=loaded).getParameterNode()
    assert loaded.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    for name, value in values.items():
        got = getattr(p2, name)
        if hasattr(value, "GetID"):
            assert got is not None and got.GetName() == value.GetName() and got.GetScene() is loaded, name
        else:
            assert got == value, name
    assert p2.verifyAttribution is None


def test_parameter_defaults(sm, scene):
    p = sm.StealthMarkLogic(scene=scene).getParameterNode()
    assert (p.verifyDevice, p.verifySamples, p.verifySeed, p.embedSteps, p.verifyModelPath) == ("auto", 0, -1, 3600, "")
    assert p.embedKeepMasks is True and p.embedSteps == sm.KEEP_MASKS_EMBED_STEPS
    assert p.embedBatchSize == sm.DEFAULT_EMBED_BATCH == 8
    p.verifySamples = 5
    p.verifySamples = None  # cleared: back to the default
    assert p.verifySamples == 0


# ---------------------------------------------------------------------------------------------------------
# The child-process runner (tiny python children)
# ---------------------------------------------------------------------------------------------------------
def run_child(sm, code: str, **kwargs):
    events = []
    runner = sm.ProcessRunner([PY, "-c", textwrap.dedent(code)], onEvent=events.append, **kwargs).start()
    return runner, events


def test_runner_parses_progress_lines_results_and_logs(sm):
    runner, events = run_child(sm, """
        import json, sys
        def emit(**e): print(json.dumps(e), flush=True)
        emit(event="start", stage="lime", total=3)
        for i in range(1, 4):
            emit(event="progress", stage="lime", done=i, total=3, message=f"step {i}")
        emit(event="finish", stage="lime")
        print("a plain line", flush=True)
        print("a warning on stderr", file=sys.stderr, flush=True)
        emit(event="log", message="hello")
        emit(event="result", verdict="owned", p_value=1e-9)
    """)
    result = runner.wait(timeout=60)
    assert result.ok and result.returncode == 0 and not result.cancelled
    assert result.result == {"verdict": "owned", "p_value": 1e-9}
    stdout_kinds = [e["event"] for e in events if e.get("stream") != "stderr"]   # stderr is read by another thread
    assert stdout_kinds[:5] == ["start", "progress", "progress", "progress", "finish"]
    assert [e["done"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    assert {"event": "log", "message": "a plain line", "stream": "stdout"} in events
    assert {"event": "log", "message": "a warning on stderr", "stream": "stderr"} in events
    assert stdout_kinds[-1] == "result"
    assert "hello" in result.log and "a warning on stderr" in result.log
    assert result.error is None


def test_runner_surfaces_the_error_event_and_the_log(sm):
    runner, _events = run_child(sm, """
        import json, sys
        print(json.dumps({"event": "log", "message": "loading the model"}), flush=True)
        print("Traceback (most recent call last):", file=sys.stderr)
        print(json.dumps({"event": "error", "message": "the model file is not TorchScript"}), flush=True)
        sys.exit(2)
    """)
    result = runner.wait(timeout=60)
    assert not result.ok and result.returncode == 2
    assert result.error == "the model file is not TorchScript"
    assert "loading the model" in result.log and "Traceback (most recent call last):" in result.log


def test_runner_error_without_an_error_event_uses_stderr(sm):
    runner, _ = run_child(sm, "raise ValueError('boom')")
    result = runner.wait(timeout=60)
    assert result.returncode == 1 and result.error == "ValueError: boom"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that will never reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


TREE_CHILD = """
    import json, signal, subprocess, sys, time
    IGNORE = {ignore}
    if IGNORE:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import signal, time\\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if IGNORE else "") +
        "time.sleep(120)"])
    print(json.dumps({{"event": "log", "message": "pids", "child": __import__("os").getpid(),
                       "grandchild": grandchild.pid}}), flush=True)
    print(json.dumps({{"event": "start", "stage": "work", "total": 100}}), flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX")
@pytest.mark.parametrize("ignore_sigterm", [False, True], ids=["polite", "stubborn"])
def test_cancel_kills_the_whole_process_tree(sm, ignore_sigterm):
    runner, events = run_child(sm, TREE_CHILD.format(ignore=ignore_sigterm), cancelGrace=1.0)
    deadline = time.monotonic() + 60
    while not any(e.get("event") == "start" for e in events):
        assert runner.poll() is None, "the child ended early"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pids = next(e for e in events if e.get("message") == "pids")
    child, grandchild = pids["child"], pids["grandchild"]
    assert _alive(child) and _alive(grandchild)
    started = time.monotonic()
    runner.cancel()
    result = runner.wait(timeout=30)
    assert result.cancelled and not result.ok
    assert result.returncode == (-9 if ignore_sigterm else 130)
    assert time.monotonic() - started < 10
    for _ in range(100):
        if not _alive(grandchild):
            break
        time.sleep(0.05)
    assert not _alive(child) and not _alive(grandchild)


def test_job_runs_finish_only_on_success_and_always_removes_its_work_dir(sm, tmp_path):
    calls = []

    def make(code, name):
        work = tmp_path / name
        work.mkdir()
        (work / "partial.bin").write_bytes(b"half")
        runner = sm.ProcessRunner([PY, "-c", code])
        runner.start()
        return sm.StealthMarkJob(name, runner, str(work), lambda r: calls.append(r.result) or "value"), work

    ok, ok_dir = make("import json; print(json.dumps({'event': 'result', 'x': 1}))", "ok")
    assert ok.wait(timeout=60) == "value" and calls == [{"x": 1}] and not ok_dir.exists()

    bad, bad_dir = make("import json, sys; print(json.dumps({'event': 'error', 'message': 'nope'})); sys.exit(2)",
                        "bad")
    with pytest.raises(sm.StealthMarkRunError, match="bad failed: nope") as info:
        bad.wait(timeout=60)
    assert "error: nope" in info.value.log and info.value.returncode == 2
    assert calls == [{"x": 1}] and not bad_dir.exists()

    slow, slow_dir = make("import time; time.sleep(60)", "slow")
    slow.cancel()
    with pytest.raises(sm.StealthMarkCancelled):
        slow.wait(timeout=60)
    assert slow.cancelled and not slow_dir.exists() and calls == [{"x": 1}]


def test_publish_is_all_or_nothing(sm, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    (src / "b.txt").write_text("b")
    out = tmp_path / "out"
    sm._publish({src / "a.txt": out / "a.txt", src / "b.txt": out / "b.txt"}, secret=True)
    assert (out / "a.txt").read_text() == "a" and (out / "b.txt").read_text() == "b"
    if os.name != "nt":
        assert (out / "a.txt").stat().st_mode & 0o077 == 0
    dest = tmp_path / "dest"
    with pytest.raises(OSError):
        sm._publish({src / "a.txt": dest / "a.txt", src / "missing.txt": dest / "b.txt"})
    assert not dest.exists() or list(dest.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Nodes <-> files on real MRML
# ---------------------------------------------------------------------------------------------------------
def test_volume_nodes_from_nifti_and_dicom_share_the_file_geometry(sm, scene, sample_files):
    from StealthMarkLib.volume import read_volume

    reference = read_volume(sample_files["nifti"])
    for path in (sample_files["nifti"], sample_files["dicom_files"][0]):
        node = load_volume(scene, path, "v")
        assert np.allclose(ijk_to_ras(node), reference.ijk_to_ras, atol=1e-4)
        assert np.allclose(slicer.util.arrayFromVolume(node), reference.array, atol=0.5)


def test_write_volume_node_keeps_voxels_and_geometry(sm, scene, sample_files, tmp_path):
    from StealthMarkLib.volume import read_volume

    node = load_volume(scene, sample_files["dicom_files"][0], "dicom")
    written = read_volume(sm.StealthMarkLogic(scene=scene).writeVolumeNode(node, tmp_path / "v.nrrd"))
    np.testing.assert_array_equal(written.array, slicer.util.arrayFromVolume(node).astype(np.float32))
    np.testing.assert_allclose(written.ijk_to_ras, ijk_to_ras(node), atol=1e-9)


def test_attribution_node_has_exactly_the_input_geometry_and_is_overlaid(sm, scene, sample_files, tmp_path):
    from StealthMarkLib.volume import read_volume, write_volume_like

    node = load_volume(scene, sample_files["nifti"], "T1")
    reference = read_volume(sample_files["nifti"])
    rng = np.random.default_rng(0)
    values = rng.normal(size=reference.shape).astype(np.float32)
    write_volume_like(values, reference, tmp_path / "lime_map.nii.gz")
    logic = sm.StealthMarkLogic(scene=scene)
    before = scene.GetNumberOfNodes()
    attribution = logic.attributionNodeFromFile(tmp_path / "lime_map.nii.gz", node, "map")
    assert scene.GetNumberOfNodes() == before and attribution.GetScene() is None  # nothing added yet
    logic.addAttributionNode(attribution, node, {"verdict": "owned"})
    assert attribution.GetScene() is scene and attribution.IsA("vtkMRMLScalarVolumeNode")
    assert attribution.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    np.testing.assert_array_equal(ijk_to_ras(attribution), ijk_to_ras(node))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(attribution), values, atol=1e-6)
    assert attribution.GetAttribute("StealthMark.verdict") == "owned"
    display = attribution.GetDisplayNode()
    assert display.GetColorNodeID() in sm.ATTRIBUTION_COLOR_NODE_IDS
    assert display.GetLevel() == 0.0 and display.GetWindow() > 0
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        assert composite.GetForegroundVolumeID() == attribution.GetID()
        assert composite.GetBackgroundVolumeID() == node.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.5)


def test_attribution_colours_exist_in_a_bare_scene(sm):
    bare = slicer.vtkMRMLScene()
    logic = sm.StealthMarkLogic(scene=bare)
    colour_id = logic.attributionColorNodeID()
    assert bare.GetNodeByID(colour_id) is not None and logic.attributionColorNodeID() == colour_id


def test_attribution_from_another_grid_is_refused(sm, scene, sample_files, tmp_path):
    from StealthMarkLib.volume import Volume, read_volume, write_volume_like

    node = load_volume(scene, sample_files["nifti"], "T1")
    ref = read_volume(sample_files["nifti"])
    shifted = Volume(ref.array, ref.spacing, tuple(np.add(ref.origin, 5.0)), ref.direction)
    write_volume_like(ref.array, shifted, tmp_path / "other.nii.gz")
    with pytest.raises(ValueError, match="different voxel geometry"):
        sm.StealthMarkLogic(scene=scene).attributionNodeFromFile(tmp_path / "other.nii.gz", node, "x")


def test_label_file_from_a_segmentation_leaves_no_nodes_behind(sm, scene, sample_files, tmp_path):
    from StealthMarkLib.volume import read_volume

    volume = load_volume(scene, sample_files["nifti"], "T1")
    labels = load_volume(scene, sample_files["mask"], "mask", labelmap=True)
    expected = slicer.util.arrayFromVolume(labels) != 0
    seg = segmentation_from_labelmap(scene, labels, volume)
    extra = seg.GetSegmentation().AddEmptySegment("", "other")
    logic = sm.StealthMarkLogic(scene=scene)
    assert [v for _t, v in logic.segmentChoices(seg)] == [seg.GetSegmentation().GetNthSegmentID(0), extra]
    before = node_ids(scene)
    label = logic.writeLabelFile(volume, seg, "brain", tmp_path / "labels.nrrd")  # by name
    assert label == "any" and node_ids(scene) == before
    written = read_volume(tmp_path / "labels.nrrd")
    np.testing.assert_array_equal(written.array != 0, expected)
    np.testing.assert_allclose(written.ijk_to_ras, ijk_to_ras(volume), atol=1e-6)
    with pytest.raises(ValueError, match="several segments"):
        logic.writeLabelFile(volume, seg, None, tmp_path / "x.nrrd")
    with pytest.raises(ValueError, match="no segment 'liver'"):
        logic.writeLabelFile(volume, seg, "liver", tmp_path / "x.nrrd")


def test_label_file_from_a_labelmap(sm, scene, sample_files, tmp_path):
    volume = load_volume(scene, sample_files["nifti"], "T1")
    labels = load_volume(scene, sample_files["mask"], "mask", labelmap=True)
    logic = sm.StealthMarkLogic(scene=scene)
    choices = logic.segmentChoices(labels)
    assert choices[0] == ("any non-zero label", "any") and [v for _t, v in choices[1:]] == ["4", "5", "6"]
    assert logic.writeLabelFile(volume, labels, "5", tmp_path / "l.nrrd") == "5"
    assert logic.writeLabelFile(volume, labels, None, tmp_path / "l.nrrd") == "any"
    dicom = load_volume(scene, sample_files["dicom_files"][0], "dicom")
    other = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(ValueError, match="does not lie on the volume's grid"):
        logic.writeLabelFile(dicom, other, None, tmp_path / "l.nrrd")


def test_inputs_are_checked_before_anything_runs(sm, scene, sample_files, tmp_path, temp_root):
    volume = load_volume(scene, sample_files["nifti"], "T1")
    labels = load_volume(scene, sample_files["mask"], "mask", labelmap=True)
    logic = sm.StealthMarkLogic(scene=scene)
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="key file"):
        logic.startVerify(volume, str(model), str(tmp_path / "nokey.json"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="scalar volume"):
        logic.startVerify(labels, str(model), str(model), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="device"):
        logic.startVerify(volume, str(model), str(model), str(tmp_path / "out"), device="tpu")
    with pytest.raises(ValueError, match="random keys: 0 .none. or at least 2"):
        logic.startVerify(volume, str(model), str(model), str(tmp_path / "out"), nullKeys=1)
    with pytest.raises(ValueError, match="overwrite an input"):
        logic.startEmbed(volume, labels, None, str(model), str(model), str(model))
    with pytest.raises(ValueError, match="payload is empty"):
        logic.startCreateKey("  ", str(tmp_path / "k.json"))
    (tmp_path / "k.json").write_text("{}")
    with pytest.raises(FileExistsError):
        logic.startCreateKey("SM:X", str(tmp_path / "k.json"))
    assert leftover_work_dirs(temp_root) == [] and not (tmp_path / "out").exists()


def test_self_test_loads_the_sample_as_a_volume_and_a_segmentation(sm, scene, tmp_path):
    from StealthMarkLib.sample_data import sample_paths
    from StealthMarkLib.volume import read_volume

    volume, segmentation = sm.StealthMarkTest.loadSampleNodes(scene)
    assert volume.GetScene() is scene and volume.GetImageData().GetDimensions() == (128, 128, 62)
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1 and seg.GetNthSegment(0).GetName() == "brain"
    sm.StealthMarkLogic(scene=scene).writeLabelFile(volume, segmentation, "brain", tmp_path / "brain.nrrd")
    expected = read_volume(sample_paths()[1]).array != 0
    np.testing.assert_array_equal(read_volume(tmp_path / "brain.nrrd").array != 0, expected)
    assert sm.StealthMarkTest().missingPackages() == []


# ---------------------------------------------------------------------------------------------------------
# Setup section
# ---------------------------------------------------------------------------------------------------------
def test_package_status_and_device(sm):
    status = {s.name: s for s in sm.packageStatus()}
    assert set(status) == {sm._requirementName(r) for r in sm.REQUIREMENTS}
    assert status["torch"].satisfied and status["torch"].installed
    assert status["SimpleITK"].neverInstalled and not status["numpy"].neverInstalled
    missing = sm.packageStatus(("surely-not-a-package-xyz>=1", "numpy>=999"))
    assert [(s.installed, s.satisfied) for s in missing] == [(None, False), (status["numpy"].installed, False)]
    assert sm.computeDeviceDescription().startswith(("CPU", "GPU"))


def test_install_pins_simpleitk_and_torch_and_is_skipped_when_testing(sm, monkeypatch, temp_root):
    statuses = [sm.PackageStatus("torch>=2.4", "torch", "2.13.0", True),
                sm.PackageStatus("SimpleITK>=2.3", "SimpleITK", "2.5.7", True),
                sm.PackageStatus("qrcode>=7.4", "qrcode", None, False),
                sm.PackageStatus("pillow>=10", "pillow", "9.0", False)]
    monkeypatch.setattr(sm, "packageStatus", lambda requirements=sm.REQUIREMENTS: statuses)
    started = []
    monkeypatch.setattr(sm.ProcessRunner, "start", lambda self: started.append(self) or self)
    job = sm.StealthMarkLogic(scene=slicer.vtkMRMLScene()).startInstall()
    args = started[0].args
    assert args[1:4] == ["-m", "pip", "install"] and args[-2:] == ["qrcode>=7.4", "pillow>=10"]
    constraints = Path(args[args.index("--constraint") + 1]).read_text().split()
    assert sorted(constraints) == ["SimpleITK==2.5.7", "torch==2.13.0"]
    shutil.rmtree(job.workDir)

    monkeypatch.setattr(slicer.app.options, "testingEnabled", True)
    with pytest.raises(RuntimeError, match="--testing"):
        sm.StealthMarkLogic(scene=slicer.vtkMRMLScene()).startInstall()
    assert len(started) == 1


# ---------------------------------------------------------------------------------------------------------
# The widget on fake Qt widgets
# ---------------------------------------------------------------------------------------------------------
def make_widget(sm):
    widget = sm.StealthMarkWidget(slicer_stubs.FakeModuleParent())
    widget.setup()
    widget.parent.isEntered = True
    return widget


def test_widget_builds_from_the_ui_and_keeps_the_parameter_node_in_step(sm, scene, dialogs, sample_files, key_file):
    volume = load_volume(scene, sample_files["nifti"], "T1")
    labels = load_volume(scene, sample_files["mask"], "mask", labelmap=True)
    seg = segmentation_from_labelmap(scene, load_volume(scene, sample_files["mask"], "m2", labelmap=True), volume)
    w = make_widget(sm)
    ui, p = w.ui, w.logic.getParameterNode()
    assert p.verifyVolume is volume  # the first volume is picked
    assert not ui.verifyApplyButton.enabled and not ui.embedApplyButton.enabled
    assert "torch" in ui.packagesLabel.text and ui.deviceLabel.text
    assert not ui.installButton.enabled  # nothing missing here

    # GUI -> parameter node
    ui.verifyModelPathLineEdit.setCurrentPath("/m/model.pt")
    ui.verifyKeyPathLineEdit.setCurrentPath(str(key_file[0]))
    ui.verifySamplesSpinBox.setValue(500)
    ui.verifyDeviceComboBox.setCurrentIndex(ui.verifyDeviceComboBox.findText("cpu"))
    ui.verifySlicesLineEdit.setText("20:30")
    ui.verifyNullKeysSpinBox.setValue(9)
    assert (p.verifyModelPath, p.verifySamples, p.verifyDevice, p.verifySlices) == ("/m/model.pt", 500, "cpu", "20:30")
    assert p.verifyNullKeys == 9
    assert ui.verifyApplyButton.enabled

    # parameter node -> GUI
    p.embedLabels = seg
    assert ui.embedLabelSelector.currentNode() is seg
    assert [ui.embedSegmentComboBox.itemText(i) for i in range(ui.embedSegmentComboBox.count())] == ["brain"]
    assert p.embedSegment == seg.GetSegmentation().GetNthSegmentID(0)
    p.embedLabels = labels
    assert ui.embedSegmentComboBox.itemText(0) == "any non-zero label" and p.embedSegment == "any"
    ui.embedSegmentComboBox.setCurrentIndex(2)
    assert p.embedSegment == "5"
    p.embedSteps = 77
    p.embedKeyPath = str(key_file[0])
    assert ui.embedStepsSpinBox.value == 77 and ui.embedCommitmentLabel.text == key_file[1]
    assert p.embedKeepMasks is True and ui.embedKeepMasksCheckBox.checked    # the library's default recipe
    ui.embedKeepMasksCheckBox.setChecked(False)
    assert p.embedKeepMasks is False and p.embedSteps == 77     # a count the user chose stays
    p.embedKeepMasks = True
    assert ui.embedKeepMasksCheckBox.checked
    # clearing the box moves the Steps box from the default recipe's count to the faster recipe's, and back
    ui.embedStepsSpinBox.setValue(sm.KEEP_MASKS_EMBED_STEPS)
    ui.embedKeepMasksCheckBox.setChecked(False)
    assert p.embedKeepMasks is False and p.embedSteps == ui.embedStepsSpinBox.value == sm.DEFAULT_EMBED_STEPS
    ui.embedKeepMasksCheckBox.setChecked(True)
    assert p.embedKeepMasks is True and p.embedSteps == sm.KEEP_MASKS_EMBED_STEPS
    # the parameter node driving the GUI (a scene being shown) is not rewritten
    p.embedKeepMasks = False
    assert not ui.embedKeepMasksCheckBox.checked and p.embedSteps == sm.KEEP_MASKS_EMBED_STEPS
    p.embedKeepMasks = True
    p.embedSteps = 77
    assert p.embedBatchSize == 8 and ui.embedBatchSizeSpinBox.value == 8
    ui.embedBatchSizeSpinBox.setValue(2)
    assert p.embedBatchSize == 2
    ui.embedPayloadLineEdit.setText("SM:ME")
    assert ui.embedCreateKeyButton.enabled

    # a new scene brings a new parameter node; closing the scene keeps the widget working
    w.onSceneStartClose(None, None)
    w.onSceneEndClose(None, None)
    w.cleanup()
    assert dialogs.errors == []


def test_widget_install_asks_first_and_never_runs_in_testing_mode(sm, scene, dialogs, monkeypatch):
    w = make_widget(sm)
    statuses = [sm.PackageStatus("qrcode>=7.4", "qrcode", None, False)]
    monkeypatch.setattr(sm, "packageStatus", lambda requirements=sm.REQUIREMENTS: statuses)
    started = []
    monkeypatch.setattr(w.logic, "startInstall", lambda **kw: started.append(kw))
    monkeypatch.setattr(w.logic, "installTorch", lambda **kw: True)
    w.refreshSetup()
    assert w.ui.installButton.enabled and "qrcode missing" in w.ui.packagesLabel.text
    dialogs.confirm = False
    w.ui.installButton.click()
    assert len(dialogs.confirmations) == 1 and "qrcode>=7.4" in dialogs.confirmations[0] and started == []
    dialogs.confirm = True
    w.ui.installButton.click()
    assert len(started) == 1
    monkeypatch.setattr(slicer.app.options, "testingEnabled", True)
    w.refreshSetup()
    assert not w.ui.installButton.enabled
    w.onInstall()
    assert len(dialogs.confirmations) == 2 and len(started) == 1
    w.cleanup()


# ---------------------------------------------------------------------------------------------------------
# End to end: the real stealthmark command
# ---------------------------------------------------------------------------------------------------------
def test_create_key_returns_the_commitment_of_a_private_key_file(sm, key_file):
    path, commitment = key_file
    assert re.fullmatch(r"[0-9a-f]{64}", commitment)
    assert json.loads(path.read_text())["commitment"] == commitment
    assert sm.StealthMarkLogic(scene=slicer.vtkMRMLScene()).keyCommitment(str(path)) == commitment
    if os.name != "nt":
        assert path.stat().st_mode & 0o077 == 0


def test_embed_from_a_volume_node_and_a_segmentation_node(embedded, temp_root):
    h = embedded["harmlessness"]
    assert embedded["path"].is_file() and embedded["path"].stat().st_size > 0
    harm_file = embedded["path"].with_name("watermarked.harmlessness.json")
    assert json.loads(harm_file.read_text()) == h
    for side in ("original", "watermarked"):
        assert 0.5 < h[side]["dice"] <= 1.0
    assert 0.0 <= h["flip_rate_clean"] < 0.05 and "dice_drop_points" in h
    assert embedded["after"] == embedded["before"]  # no node left from the export
    stages = {e.get("stage") for e in embedded["events"] if e["event"] == "progress"}
    assert "embed" in stages
    assert leftover_work_dirs(temp_root) == []


@pytest.mark.parametrize("keep", [True, False])
def test_embed_keeping_the_trigger_masks_reaches_the_command(sm, sample_files, clean_model, key_file, tmp_path, keep):
    """The Embed panel's "Keep the key image's mask" box: ticked (the default), the command trains with
    keep_trigger_masks; cleared, without it (`embed --no-keep-trigger-masks`)."""
    from StealthMarkLib.models import load_model

    scene = new_scene()
    volume = load_volume(scene, sample_files["nifti"], "T1")
    labels = load_volume(scene, sample_files["mask"], "mask", labelmap=True)
    out = tmp_path / "kept.pt"
    recipe = {} if keep else {"keepTriggerMasks": False}         # the logic's default: the box's default
    sm.StealthMarkLogic(scene=scene).embedFromNodes(volume, labels, "any", str(clean_model), str(key_file[0]),
                                                    str(out), steps=2, device="cpu", batchSize=4, **recipe)
    config = load_model(out, device="cpu").spec.metadata["stealthmark"]["training"]["config"]
    assert config["keep_trigger_masks"] is keep and config["steps"] == 2
    # the Batch size box: `embed --batch-size 4`
    assert (config["clean_batch"], config["trigger_batch"], config["key_images_per_batch"],
            config["decoys_per_batch"]) == (4, 4, 1, 2)
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        sm.StealthMarkLogic(scene=scene).startEmbed(volume, labels, "any", str(clean_model), str(key_file[0]),
                                                    str(tmp_path / "x.pt"), steps=2, device="cpu", batchSize=0)
    assert not (tmp_path / "x.pt").exists()


def verify_node(sm, scene, node, model, key, out, **kw):
    logic = sm.StealthMarkLogic(scene=scene)
    before = node_ids(scene)
    report, attribution = logic.verifyVolumeNode(node, str(model), str(key), str(out), device="cpu", **kw)
    added = node_ids(scene) - before
    assert attribution.GetID() in added
    return report, attribution


def check_attribution(node, attribution, out):
    assert attribution.IsA("vtkMRMLScalarVolumeNode")
    assert attribution.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    assert attribution.GetSpacing() == node.GetSpacing()
    assert attribution.GetOrigin() == node.GetOrigin()
    m1, m2 = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    attribution.GetIJKToRASDirectionMatrix(m1)
    node.GetIJKToRASDirectionMatrix(m2)
    assert [m1.GetElement(r, c) for r in range(4) for c in range(4)] == \
        [m2.GetElement(r, c) for r in range(4) for c in range(4)]
    np.testing.assert_array_equal(ijk_to_ras(attribution), ijk_to_ras(node))
    values = slicer.util.arrayFromVolume(attribution)
    assert np.isfinite(values).all() and np.abs(values).max() > 0
    assert sorted(p.name for p in Path(out).iterdir()) == ["lime_map.nii.gz", "qr.png", "report.html", "report.json"]


def test_verify_a_nifti_volume_node_with_the_watermarked_model(sm, scene, sample_files, embedded, key_file, tmp_path,
                                                               temp_root):
    node = load_volume(scene, sample_files["nifti"], "T1 NIfTI")
    events = []
    report, attribution = verify_node(sm, scene, node, embedded["path"], key_file[0], tmp_path / "report",
                                      progressCallback=events.append)
    assert report["verdict"] == "owned", report
    assert report["payload_decoded"] == PAYLOAD and report["payload_match"] is True
    assert report["key_commitment"] == key_file[1]
    check_attribution(node, attribution, tmp_path / "report")
    assert json.loads((tmp_path / "report" / "report.json").read_text())["verdict"] == "owned"
    assert attribution.GetAttribute("StealthMark.verdict") == "owned"
    assert any(e["event"] == "progress" and e.get("stage") == "lime" for e in events)
    assert leftover_work_dirs(temp_root) == []


def test_verify_a_dicom_volume_node_with_the_watermarked_model(sm, scene, sample_files, embedded, key_file, tmp_path):
    node = load_volume(scene, sample_files["dicom_files"][0], "T1 DICOM")
    assert node.GetImageData().GetDimensions()[2] == len(sample_files["dicom_files"])
    report, attribution = verify_node(sm, scene, node, embedded["path"], key_file[0], tmp_path / "report")
    assert report["verdict"] == "owned", report
    check_attribution(node, attribution, tmp_path / "report")


def test_verify_the_clean_model_is_not_owned(sm, scene, sample_files, clean_model, key_file, tmp_path):
    node = load_volume(scene, sample_files["nifti"], "T1")
    report, attribution = verify_node(sm, scene, node, clean_model, key_file[0], tmp_path / "report",
                                      slices="30:34", samples=600, seed=3)
    assert report["verdict"] == "not-owned" and report["payload_decoded"] is None, report
    assert report["lime_samples"] == 600 and report["slices"] == [30, 31, 32, 33]
    check_attribution(node, attribution, tmp_path / "report")


def test_a_failed_run_leaves_no_node_and_no_file_and_says_why(sm, scene, sample_files, key_file, tmp_path, temp_root):
    node = load_volume(scene, sample_files["nifti"], "T1")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"this is not a model")
    before = node_ids(scene)
    logic = sm.StealthMarkLogic(scene=scene)
    with pytest.raises(sm.StealthMarkRunError) as info:
        logic.verifyVolumeNode(node, str(broken), str(key_file[0]), str(tmp_path / "report"), device="cpu")
    assert not isinstance(info.value, sm.StealthMarkCancelled)
    assert "broken.pt" in str(info.value) and info.value.returncode == 2
    assert any("broken.pt" in line for line in info.value.log)
    assert node_ids(scene) == before and not (tmp_path / "report").exists()
    assert leftover_work_dirs(temp_root) == []


def test_a_cancelled_run_leaves_no_node_and_no_file(sm, scene, sample_files, embedded, key_file, tmp_path,
                                                    temp_root):
    node = load_volume(scene, sample_files["nifti"], "T1")
    before = node_ids(scene)
    events = []
    job = sm.StealthMarkLogic(scene=scene).startVerify(node, str(embedded["path"]), str(key_file[0]),
                                                       str(tmp_path / "report"), samples=20000, device="cpu",
                                                       progressCallback=events.append)
    deadline = time.monotonic() + 120
    while not any(e["event"] == "progress" for e in events):
        assert not job.poll(), job.exception
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job.cancel()
    with pytest.raises(sm.StealthMarkCancelled):
        job.wait(timeout=60)
    assert job.runResult.returncode == 130  # the command stopped cleanly on SIGTERM
    assert node_ids(scene) == before and not (tmp_path / "report").exists()
    assert leftover_work_dirs(temp_root) == []


def test_widget_verify_shows_the_result_and_apply_turns_into_cancel(sm, scene, dialogs, sample_files, embedded,
                                                                    key_file, tmp_path):
    node = load_volume(scene, sample_files["nifti"], "T1")
    w = make_widget(sm)
    ui, p = w.ui, w.logic.getParameterNode()
    p.verifyVolume, p.verifyModelPath, p.verifyKeyPath = node, str(embedded["path"]), str(key_file[0])
    p.verifyDevice, p.verifyOutputDir = "cpu", str(tmp_path / "report")

    # first run: cancel as soon as it reports progress
    p.verifySamples = 20000
    ui.verifyApplyButton.click()
    assert ui.verifyApplyButton.text == "Cancel" and ui.verifyApplyButton.enabled and not ui.embedApplyButton.enabled
    assert ui.progressBar.visible
    slicer_stubs.run_timers(lambda: ui.progressBar.value > 0)
    ui.verifyApplyButton.click()
    slicer_stubs.run_timers(lambda: w._job is None)
    assert ui.verifyApplyButton.text == "Verify" and "cancelled" in ui.statusLabel.text
    assert not (tmp_path / "report").exists() and p.verifyAttribution is None and dialogs.errors == []

    # second run: to the end, with two random keys to set the key against
    p.verifySamples, p.verifyNullKeys = 0, 2
    ui.verifyApplyButton.click()
    slicer_stubs.run_timers(lambda: w._job is None)
    assert dialogs.errors == [], dialogs.errors
    assert "owned" in ui.verdictLabel.text and PAYLOAD in ui.payloadLabel.text
    assert ui.pValueLabel.text and "%" in ui.agreementLabel.text
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["null_keys"]["n_keys"] == 2 and len(report["null_keys"]["agreements"]) == 2
    assert ui.nullKeysLabel.text == sm.nullKeysText(report["null_keys"]) and "2 random keys" in ui.nullKeysLabel.text
    assert ui.qrImageLabel.pixmap() is not None and not ui.qrImageLabel.pixmap().isNull()
    assert "report.html" in ui.reportLinkLabel.text
    assert p.verifyAttribution is not None and p.verifyAttribution.GetScene() is scene
    assert any("verifying on" in line for line in ui.logTextEdit.lines)
    w.cleanup()


def test_widget_embed_failure_shows_the_message_and_the_log(sm, scene, dialogs, sample_files, key_file, tmp_path):
    volume = load_volume(scene, sample_files["nifti"], "T1")
    labels = load_volume(scene, sample_files["mask"], "mask", labelmap=True)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    w = make_widget(sm)
    ui, p = w.ui, w.logic.getParameterNode()
    p.embedVolume, p.embedLabels = volume, labels
    p.embedModelPath, p.embedKeyPath, p.embedOutputPath = str(broken), str(key_file[0]), str(tmp_path / "wm.pt")
    assert p.embedSegment == "any" and ui.embedApplyButton.enabled
    before = node_ids(scene)
    ui.embedApplyButton.click()
    assert ui.embedApplyButton.text == "Cancel"
    slicer_stubs.run_timers(lambda: w._job is None)
    assert ui.embedApplyButton.text == "Embed watermark"
    assert len(dialogs.errors) == 1
    message, detail = dialogs.errors[0]
    assert "Embedding failed" in message and "broken.pt" in message and "broken.pt" in detail
    assert not (tmp_path / "wm.pt").exists() and list(tmp_path.iterdir()) == [broken]
    assert node_ids(scene) == before
    w.cleanup()


def test_widget_creates_a_key_from_a_payload(sm, scene, dialogs, tmp_path):
    w = make_widget(sm)
    ui, p = w.ui, w.logic.getParameterNode()
    ui.embedPayloadLineEdit.setText("SM:WIDGET")
    slicer_stubs.QFileDialog.next_save_file_name = str(tmp_path / "new-key.json")
    ui.embedCreateKeyButton.click()
    slicer_stubs.run_timers(lambda: w._job is None)
    assert dialogs.errors == []
    commitment = json.loads((tmp_path / "new-key.json").read_text())["commitment"]
    assert p.embedKeyPath == str(tmp_path / "new-key.json") and ui.embedCommitmentLabel.text == commitment
    assert commitment in ui.statusLabel.text
    w.cleanup()


def test_widget_offers_the_cpu_after_a_gpu_out_of_memory_failure(sm, scene, dialogs, sample_files, tmp_path,
                                                                 monkeypatch):
    """The command's out-of-memory exit (status 3) is met with 'run again on the CPU?' (a fake child here:
    no GPU on the test machine)."""
    node = load_volume(scene, sample_files["nifti"], "T1")
    w = make_widget(sm)
    p = w.logic.getParameterNode()
    p.verifyVolume, p.verifyModelPath, p.verifyKeyPath, p.verifyOutputDir = node, "m.pt", "k.json", str(tmp_path)
    devices = []
    oom = ("import json, sys; print(json.dumps({'event': 'error', 'exit_code': 3, 'message': "
           "'out of GPU memory: lower --batch-size or use --device cpu'})); sys.exit(3)")

    def fake_start_verify(volume, model, key, out, slices=None, samples=None, seed=None, device="auto",
                          progressCallback=None, nullKeys=0):
        devices.append(device)
        code = oom if device != "cpu" else "print('{\"event\": \"result\"}')"
        runner = sm.ProcessRunner([PY, "-c", code], onEvent=progressCallback).start()
        return sm.StealthMarkJob("Verification", runner, None, lambda r: ({"verdict": "not-owned"}, node))

    monkeypatch.setattr(w.logic, "startVerify", fake_start_verify)
    w.ui.verifyApplyButton.click()
    slicer_stubs.run_timers(lambda: len(devices) == 2 and w._job is None)
    assert devices == ["auto", "cpu"] and p.verifyDevice == "cpu"
    assert len(dialogs.confirmations) == 1 and "out of GPU memory" in dialogs.confirmations[0]
    assert dialogs.errors == [] and "not-owned" in w.ui.verdictLabel.text
    w.cleanup()


def test_widget_embed_out_of_memory_names_the_batch_size_box(sm, scene, dialogs, sample_files, key_file, tmp_path,
                                                            monkeypatch):
    """Embedding out of GPU memory: the question names the Embed panel's Batch size as the other way out;
    declined, nothing runs again and the error is shown."""
    w = make_widget(sm)
    p = w.logic.getParameterNode()
    p.embedVolume = load_volume(scene, sample_files["nifti"], "T1")
    p.embedLabels = load_volume(scene, sample_files["mask"], "mask", labelmap=True)
    p.embedModelPath, p.embedKeyPath, p.embedOutputPath = "m.pt", str(key_file[0]), str(tmp_path / "wm.pt")
    assert w.ui.embedApplyButton.enabled
    batches = []
    oom = ("import json, sys; print(json.dumps({'event': 'error', 'exit_code': 3, 'message': "
           "'out of GPU memory while embedding: lower --batch-size or use --device cpu'})); sys.exit(3)")

    def fake_start_embed(*args, batchSize=None, progressCallback=None, **kw):
        batches.append(batchSize)
        runner = sm.ProcessRunner([PY, "-c", oom], onEvent=progressCallback).start()
        return sm.StealthMarkJob("Embedding", runner, None, lambda r: {})

    monkeypatch.setattr(w.logic, "startEmbed", fake_start_embed)
    dialogs.confirm = False
    w.ui.embedBatchSizeSpinBox.setValue(4)
    w.ui.embedApplyButton.click()
    slicer_stubs.run_timers(lambda: w._job is None)
    assert batches == [4] and p.embedDevice == "auto"
    assert len(dialogs.confirmations) == 1 and "lower the Batch size" in dialogs.confirmations[0]
    assert len(dialogs.errors) == 1 and "out of GPU memory" in dialogs.errors[0][0]
    assert not (tmp_path / "wm.pt").exists()
    w.cleanup()
