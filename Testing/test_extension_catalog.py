"""The Slicer Extensions Index's own checks, run offline on this repository.

Mirrors `scripts/check_description_files.py` of Slicer/ExtensionsIndex (schema, category,
repository name, scm_url syntax, CMakeLists.txt project name / icon / screenshots, licence file),
with each URL mapped to the file it resolves to in this repository (raw URL of the branch in
`scm_revision`), plus Slicer's own reading of the entry (`cmake -P` with
SlicerFunctionExtractExtensionDescription.cmake) and the sample data registered with Slicer's
Sample Data module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "Utilities" / "UniUltra.json"
CMAKELISTS = REPO / "CMakeLists.txt"
SLICER_REF = Path(os.environ.get("UNIULTRA_SLICER_REF", REPO.parent / "shared" / "reference" / "slicer"))
SCHEMA = SLICER_REF / "Schemas" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
EXTRACT = SLICER_REF / "Extensions" / "CMake" / "SlicerFunctionExtractExtensionDescription.cmake"

# The index's ACCEPTED_EXTENSION_CATEGORIES that fit this extension (the whole list is longer)
ACCEPTED_CATEGORIES = {"Segmentation", "Ultrasound"}
LICENSE_NAMES = ["LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt"]


@pytest.fixture(scope="module")
def entry() -> dict:
    return json.loads(ENTRY.read_text())


@pytest.fixture(scope="module")
def cmake_text() -> str:
    return CMAKELISTS.read_text()


def raw_base(entry: dict) -> str:
    """https://raw.githubusercontent.com/<owner>/<repo>/<scm_revision>/ for a GitHub scm_url."""
    parts = urllib.parse.urlsplit(entry["scm_url"])
    assert parts.netloc == "github.com", f"scm_url must be a GitHub repository: {entry['scm_url']}"
    owner, name = parts.path.strip("/").removesuffix(".git").split("/")
    return f"https://raw.githubusercontent.com/{owner}/{name}/{entry['scm_revision']}/"


def repo_file(url: str, entry: dict) -> Path:
    """The repository file a raw URL of the entry's branch resolves to (fails for any other URL)."""
    base = raw_base(entry)
    assert url.startswith(base), f"{url} is not a raw URL of {base}"
    path = REPO / urllib.parse.unquote(url[len(base):])
    assert path.is_file(), f"{url} resolves to {path.relative_to(REPO)}, which is not in the repository"
    return path


def cmake_set(cmake_text: str, name: str) -> str:
    m = re.search(r"set\s*\(\s*" + name + r"\s+\"?([^\")]*)\"?\s*\)", cmake_text)
    assert m, f"set({name} ...) not found in CMakeLists.txt"
    return m.group(1).strip()


# ------------------------------------------------------------------ the index's checks

@pytest.mark.skipif(not SCHEMA.exists(), reason=f"Slicer's schema not found at {SCHEMA}")
def test_entry_is_valid_against_slicers_schema(entry):
    schema = json.loads(SCHEMA.read_text())
    assert entry["$schema"].split("#")[0] == schema["$id"].split("#")[0]
    jsonschema.validate(entry, schema)
    # the schema allows no other key: v1.0.2 has no "keywords" (Slicer's CMake reader would take them)
    for bad in ({**entry, "tier": 7}, {k: v for k, v in entry.items() if k != "scm_url"}, {**entry, "scmurl": "x"},
                {**entry, "keywords": ["ultrasound"]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_category_repository_name_and_scm_url(entry):
    assert entry["category"] in ACCEPTED_CATEGORIES
    parts = urllib.parse.urlsplit(entry["scm_url"])
    assert "://" in entry["scm_url"] and parts.scheme in ("git", "https")
    repo_name = os.path.splitext(parts.path.split("/")[-1])[0]
    assert "slicer" in repo_name.lower(), f"repository name '{repo_name}' must contain 'Slicer'"
    assert not re.fullmatch(r"[0-9a-f]{40}", entry["scm_revision"]), "use a branch, not a commit hash"
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    # every build dependency must be an extension the index has; PyTorch is SlicerPyTorch's entry
    assert entry["build_dependencies"] == ["PyTorch"]


def test_file_name_project_and_extension_name_agree(entry, cmake_text):
    name = ENTRY.stem
    # the index's own pattern: the first project(...) in the top-level CMakeLists.txt
    project = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", cmake_text, re.IGNORECASE | re.MULTILINE)[0]
    assert project.strip("\"'") == name
    assert cmake_set(cmake_text, "EXTENSION_NAME") == name
    assert cmake_set(cmake_text, "EXTENSION_CATEGORY") == entry["category"]
    assert cmake_set(cmake_text, "EXTENSION_DEPENDS").split() == entry["build_dependencies"]
    homepage = cmake_set(cmake_text, "EXTENSION_HOMEPAGE")
    assert homepage.split("#")[0].rstrip("/") == entry["scm_url"].removesuffix(".git")


def test_icon_is_a_128px_png_in_the_repository(entry, cmake_text):
    # the index's regex, so a form it cannot parse fails here too
    urls = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', cmake_text, re.IGNORECASE | re.MULTILINE)
    assert urls and urls[0].startswith("http")
    icon = repo_file(urls[0].strip(), entry)
    with Image.open(icon) as im:
        assert im.format == "PNG" and im.size == (128, 128)
        im.verify()


def test_screenshots_are_real_images_in_the_repository(entry, cmake_text):
    found = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', cmake_text, re.IGNORECASE | re.MULTILINE)
    assert found, "no EXTENSION_SCREENSHOTURLS in CMakeLists.txt"
    urls = found[0].split()
    assert len(urls) >= 1
    for url in urls:
        assert url.startswith("http") and url.lower().endswith((".png", ".jpg", ".jpeg"))
        path = repo_file(url, entry)
        assert path.stat().st_size < 500_000, f"{path.name} is {path.stat().st_size} bytes: keep screenshots small"
        with Image.open(path) as im:
            assert im.format in ("PNG", "JPEG")
            assert im.width >= 400 and im.height >= 200
            im.verify()
    # each screenshot says what it is and how it was made
    record = json.loads((REPO / "Resources" / "Screenshots" / "screenshots.json").read_text())
    assert "not a capture of the Slicer application window" in record["rendering"]
    assert (REPO / record["made_by"]).is_file()
    for url in urls:
        assert Path(url).name in record


def test_license_file_at_the_root():
    found = [n for n in LICENSE_NAMES if (REPO / n).is_file()]
    assert found, "no licence file at the repository root"
    assert "Apache License" in (REPO / found[0]).read_text()[:2000]


# ------------------------------------------------------------------ Slicer's build reads the entry

def _cmake_at_least(cmake: str, version: tuple[int, int]) -> bool:
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= version


def _find_cmake() -> str | None:
    """A cmake that Slicer's extraction script accepts (it requires 3.28): the venv's first."""
    candidates = [str(Path(sys.executable).parent / "cmake"), shutil.which("cmake")]
    return next((c for c in candidates if c and Path(c).exists() and _cmake_at_least(c, (3, 28))), None)


@pytest.mark.skipif(not EXTRACT.exists(), reason=f"Slicer's extraction script not found at {EXTRACT}")
def test_slicers_extraction_function_reads_the_entry(entry, tmp_path):
    cmake = _find_cmake()
    if cmake is None:
        pytest.skip("no cmake >= 3.28 (SlicerFunctionExtractExtensionDescription.cmake requires it); "
                    "`pip install .[dev]` installs one")
    script = tmp_path / "extract.cmake"
    script.write_text(
        f'include("{EXTRACT.as_posix()}")\n'
        f'slicerFunctionExtractExtensionDescriptionFromJson(EXTENSION_FILE "{ENTRY.as_posix()}" VAR_PREFIX uu)\n'
        "foreach(n SCM_TYPE SCM_URL SCM_REVISION CATEGORY BUILD_SUBDIRECTORY BUILD_DEPENDENCIES ENABLED TIER\n"
        "          DICOM_SUPPORT_RULE KEYWORDS)\n"
        '  message(STATUS "uu_${n}=[${uu_EXT_${n}}]")\n'
        "endforeach()\n"
    )
    run = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = dict(re.findall(r"uu_(\w+)=\[(.*)\]", run.stdout + run.stderr))
    assert got["SCM_TYPE"] == "git"  # the default
    assert got["SCM_URL"] == entry["scm_url"]
    assert got["SCM_REVISION"] == entry["scm_revision"]
    assert got["CATEGORY"] == entry["category"]
    assert got["BUILD_SUBDIRECTORY"] == "."
    assert got["BUILD_DEPENDENCIES"].split(";") == entry["build_dependencies"]
    assert got["ENABLED"] == "1"
    assert got["TIER"] == str(entry["tier"])
    assert got["DICOM_SUPPORT_RULE"] == entry["dicom_support_rule"]


# ------------------------------------------------------------------ the DICOM support rule

def _dicom_attributes(path) -> dict:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {"Modality": str(ds.get("Modality", "")), "SOPClassUID": str(ds.get("SOPClassUID", ""))}


def test_dicom_support_rule_matches_ultrasound_only(entry):
    """The rule is a rule-engine expression (the schema's stated syntax); it accepts real
    ultrasound DICOM and rejects CT and MR."""
    import pydicom.examples
    import rule_engine

    rule = rule_engine.Rule(entry["dicom_support_rule"])
    us = [_dicom_attributes(pydicom.examples.get_path("ybr_color"))]
    echo = REPO.parent / "shared" / "data" / "dicom" / "US-PAL-8-10x-echo.dcm"
    if echo.exists():
        us.append(_dicom_attributes(echo))
    for attrs in us:
        assert attrs["Modality"] == "US" and rule.matches(attrs), attrs
    # a multi-frame US object whose Modality is not filled still matches on its SOP class
    assert rule.matches({"Modality": "", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.3.1"})
    for other in (pydicom.examples.get_path("ct"), pydicom.examples.get_path("mr")):
        attrs = _dicom_attributes(other)
        assert attrs["Modality"] in ("CT", "MR") and not rule.matches(attrs), attrs


# ------------------------------------------------------------------ sample data in Slicer

def _sampledata():
    sys.path.insert(0, str(REPO / "UniUltraSegment"))
    try:
        from UniUltraSegmentLib import sampledata
    finally:
        sys.path.remove(str(REPO / "UniUltraSegment"))
    return sampledata


class _FakeSampleDataModule:
    """Stands in for Slicer's SampleData module: records the calls, with the real signature."""

    def __init__(self):
        calls = self.calls = []

        class SampleDataLogic:
            @staticmethod
            def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                               nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                               loadFileType="VolumeFile", loadFiles=None, loadFileProperties={},  # noqa: B006
                                               checksums=None):
                calls.append(dict(category=category, sampleName=sampleName, uris=uris, fileNames=fileNames,
                                  nodeNames=nodeNames, thumbnailFileName=thumbnailFileName,
                                  loadFileType=loadFileType, checksums=checksums))

        self.SampleDataLogic = SampleDataLogic


def test_sample_data_registration_downloads_and_verifies(entry, tmp_path):
    sd = _sampledata()
    fake = _FakeSampleDataModule()
    assert sd.register_sample_data(fake) == 2
    names = {c["sampleName"] for c in fake.calls}
    assert names == {"UniUltraCarotidUS", "UniUltraCarotidCine"}
    assert sd.REPOSITORY_RAW_URL == raw_base(entry)
    for call in fake.calls:
        assert call["category"] == "UniUltra" and call["loadFileType"] in ("VolumeFile", "SequenceFile")
        assert Path(call["thumbnailFileName"]).is_file()
        algo, digest = call["checksums"].split(":")
        assert algo == "SHA256" and re.fullmatch(r"[0-9a-f]{64}", digest)
        # what Sample Data does with it: fetch the URI into the cache, then compare the checksum
        cached = tmp_path / call["fileNames"]
        urllib.request.urlretrieve(call["uris"], cached)
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest
        # and the raw URL on the branch points at the very same committed file
        assert repo_file(sd.REPOSITORY_RAW_URL + sd.repository_path(call["fileNames"]), entry).read_bytes() \
            == cached.read_bytes()
    # without the installed copy the URI is the raw URL of the file on the branch
    offline = {c["fileNames"]: c["uris"] for c in sd.sample_sources(tmp_path / "nowhere")}
    assert offline["CarotidUS.png"] == raw_base(entry) + "UniUltraSegment/Resources/SampleData/CarotidUS.png"
    # the files are shipped with the module (installed next to it) and are small
    module_cmake = (REPO / "UniUltraSegment" / "CMakeLists.txt").read_text()
    for _name, file_name, *_ in sd.SAMPLES:
        assert f"Resources/SampleData/{file_name}" in module_cmake
    assert "${MODULE_NAME}Lib/sampledata.py" in module_cmake
    assert sum((sd.SAMPLE_DIR / f).stat().st_size for _n, f, *_ in sd.SAMPLES) < 1_000_000
