"""Load the extension's scripted modules and its Segment Editor effect exactly as Slicer does.

What this proves
----------------
Slicer (>= 5.10) loads a scripted module file with `qSlicerScriptedLoadableModule::setPythonSource`
(module name = file name, class name = module name) and an effect file with
`qSlicerSegmentEditorScriptedEffect::setPythonSource` (module name = *the parent folder's name*,
class name = file name + "Effect"); both, when the module is not in `sys.modules` yet, run
`qSlicerScriptedUtils::loadSourceAsModule`, i.e. the Python string below, verbatim
(Base/QTCore/qSlicerScriptedUtils.cxx).  The scripted-module factory first puts the module's folder
on `sys.path`.  This test repeats those steps with the real `slicer` (MRML core, `slicer.util`) and
`vtk` from slicer-core, then fires `startupCompleted()`, registers the effect, clones it, and checks
that every module of the extension's own packages still imports: the failure the Slicer API audit
found (the effect file loaded *as* `UniUltraSegmentLib`, so that package and both panels broke) is
caught here, as the negative control shows.

What it cannot show
-------------------
Stand-ins replace what exists only inside the Slicer application: `qt`, `ctk`, the PythonQt
wrapper `qSlicerSegmentationsEditorEffectsPythonQt`, `SegmentEditorEffects`, `SampleData`,
`slicer.ScriptedLoadableModule`, `slicer.i18n` and `slicer.app`.  So it does not show that widgets
build, that PythonQt converts the arguments, or that events reach the effect: the module's
self-test (UniUltraSegmentTest, run by Slicer's ctest) covers those inside Slicer.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import slicer
from mrml_fixtures import REPO

pytestmark = pytest.mark.mrml

# Base/QTCore/qSlicerScriptedUtils.cxx, loadSourceAsModule (Slicer >= 5.10), %1 = path, %2 = name
LOAD_SOURCE_AS_MODULE = (
    "import importlib.util;"
    "import sys;"
    "spec = importlib.util.spec_from_file_location({name!r}, {path!r});"
    "module = importlib.util.module_from_spec(spec);"
    "sys.modules[{name!r}] = module;"
    "spec.loader.exec_module(module)"
)
MODULE_FILES = [REPO / "UniUltraSegment" / "UniUltraSegment.py", REPO / "UniUltraTrain" / "UniUltraTrain.py"]
OWN_PACKAGES = [REPO / "UniUltraSegment" / "UniUltraSegmentLib", REPO / "UniUltraTrain" / "UniUltraTrainLib"]


def load_source_as_module(name: str, path: Path) -> None:
    main = sys.modules["__main__"].__dict__
    exec(LOAD_SOURCE_AS_MODULE.format(name=name, path=str(path).replace("\\", "/")), main, {})


class ScriptedEffect:
    """qSlicerSegmentEditorScriptedEffect: setPythonSource as qSlicerSegmentEditorScriptedEffect.cxx."""

    registered: list = []

    def __init__(self, parent=None):
        self._self = None

    def setPythonSource(self, path: str) -> bool:
        if not path.endswith((".py", ".pyc")):
            return False
        module_name = Path(path).parent.name  # "Use parent directory name as module name"
        class_name = Path(path).name.split(".")[0]  # QFileInfo::baseName
        if not class_name.endswith("Effect"):
            class_name += "Effect"
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is None:
            load_source_as_module(module_name, Path(path))
            cls = getattr(sys.modules[module_name], class_name, None)
        if cls is None:
            raise RuntimeError(f"class {class_name} was not found in {path}")
        self._self = cls(self)
        return True

    def self(self):
        return self._self


class ModuleParent:
    """What qSlicerScriptedLoadableModule passes as `parent`."""

    def __init__(self):
        self.title = self.categories = self.dependencies = self.contributors = None
        self.helpText = self.acknowledgementText = ""


def load_scripted_module(path: Path):
    """qSlicerScriptedLoadableModule::setPythonSource (Slicer >= 5.10) after the factory's sys.path step."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # qSlicerScriptedLoadableModuleFactory.cxx
    name = path.stem
    module = sys.modules.get(name)
    if module is None or not hasattr(module, name):
        load_source_as_module(name, path)
    cls = getattr(sys.modules[name], name)
    return cls(ModuleParent())


def _stand_ins():
    """Modules that exist only inside the Slicer application."""
    def any_module(name):
        m = types.ModuleType(name)
        m.__getattr__ = lambda attr: mock.MagicMock(name=f"{name}.{attr}")
        return m

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect

        def register(self):
            ScriptedEffect.registered.append(self)

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

        def getDefaultModuleDocumentationLink(self, docPage=None):
            return ""

    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = ScriptedLoadableModule
    for n in ("ScriptedLoadableModuleLogic", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(slm, n, type(n, (), {}))
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    effects = types.ModuleType("SegmentEditorEffects")
    effects.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    wrappers = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    wrappers.qSlicerSegmentEditorScriptedEffect = ScriptedEffect
    return {
        "qt": any_module("qt"),
        "ctk": any_module("ctk"),
        "SampleData": any_module("SampleData"),
        "SegmentEditorEffects": effects,
        "qSlicerSegmentationsEditorEffectsPythonQt": wrappers,
        "slicer.ScriptedLoadableModule": slm,
        "slicer.i18n": i18n,
    }


class App:
    """slicer.app: records connect("startupCompleted()", slot) so the test can emit the signal."""

    majorVersion, minorVersion = 5, 10

    def __init__(self):
        self.slots = []

    def connect(self, signal, slot):
        if signal == "startupCompleted()":
            self.slots.append(slot)


@pytest.fixture
def slicer_like(monkeypatch):
    """A Python process set up like Slicer's for the extension's files; undone afterwards."""
    saved_modules = dict(sys.modules)
    saved_path = list(sys.path)
    for name in [n for n in sys.modules if n.split(".")[0] in ("UniUltraSegmentLib", "UniUltraTrainLib",
                                                                "SegmentEditorUniUltraLib", "UniUltraSegment",
                                                                "UniUltraTrain")]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith(("UniUltraSegment", "UniUltraTrain"))]
    for name, module in _stand_ins().items():
        sys.modules[name] = module
    app = App()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", sys.modules["slicer.ScriptedLoadableModule"], raising=False)
    monkeypatch.setattr(slicer, "i18n", sys.modules["slicer.i18n"], raising=False)
    ScriptedEffect.registered = []
    yield app
    sys.modules.clear()
    sys.modules.update(saved_modules)
    sys.path[:] = saved_path


def _import_every_own_module():
    for package in OWN_PACKAGES:
        importlib.import_module(package.name)
        for f in sorted(package.glob("*.py")):
            if f.stem != "__init__":
                importlib.import_module(f"{package.name}.{f.stem}")
        assert hasattr(sys.modules[package.name], "__path__"), f"{package.name} is no longer a package"


def test_modules_and_effect_load_as_in_slicer(slicer_like):
    modules = [load_scripted_module(path) for path in MODULE_FILES]
    assert [m.parent.title for m in modules] == ["UniUltra Segment", "UniUltra Train"]
    for slot in slicer_like.slots:  # the application emits startupCompleted()
        slot()
    assert len(ScriptedEffect.registered) == 1, "the UniUltra effect was not registered"
    effect = ScriptedEffect.registered[0]
    assert type(effect).__name__ == "SegmentEditorEffect"
    assert effect.scriptedEffect.name == "UniUltra" and effect.scriptedEffect.perSegment
    assert sys.modules["SegmentEditorUniUltraLib"].SegmentEditorEffect is type(effect)
    clone = effect.clone()  # what the Segment Editor does for every editor widget
    assert type(clone.self()) is type(effect)
    _import_every_own_module()
    from UniUltraSegmentLib import models

    assert any(e.name == "uniultra-mini-us" for e in models.load_registry())


def test_too_old_slicer_gets_a_message_not_a_broken_effect(slicer_like, caplog):
    slicer_like.minorVersion = 8
    load_scripted_module(MODULE_FILES[0])
    for slot in slicer_like.slots:
        slot()
    assert ScriptedEffect.registered == []
    assert "needs 3D Slicer 5.10 or later" in caplog.text


def test_negative_control_the_old_layout_breaks(slicer_like, tmp_path):
    """The audit's defect, reproduced: an effect file inside the package it imports is loaded *as*
    that package, so the effect fails and the package is broken for everyone after it."""
    lib = tmp_path / "UniUltraSegmentLib"
    shutil.copytree(REPO / "UniUltraSegment" / "UniUltraSegmentLib", lib)
    shutil.copy(REPO / "UniUltraSegment" / "SegmentEditorUniUltraLib" / "SegmentEditorEffect.py", lib)
    sys.path.insert(0, str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="is not a package"):
        ScriptedEffect().setPythonSource(str(lib / "SegmentEditorEffect.py"))
    with pytest.raises(ImportError):
        importlib.import_module("UniUltraSegmentLib.models")
