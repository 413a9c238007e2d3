"""UniUltra's sample data in Slicer's Sample Data module (no Qt here; `SampleData` is imported lazily).

Two small files ship in the repository (and inside the extension, next to this module):
a B-mode image and a 10-frame cine clip of the common carotid artery (Momot 2022, CC BY 4.0).
Each is registered the way Slicer's own modules register theirs
(`SampleData.SampleDataLogic.registerCustomSampleDataSource` with a ``SHA256:<digest>``
checksum): the URI is the copy installed with the extension when it is there, so step one of
the tutorial needs no network, and otherwise the file's raw URL on the branch the Extensions
Index builds.  Sample Data copies/downloads it into Slicer's cache and checks the checksum
either way.
"""

from __future__ import annotations

from pathlib import Path

CATEGORY = "UniUltra"
REPOSITORY_RAW_URL = "https://raw.githubusercontent.com/uniultra/SlicerUniUltra/main/"
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"

# sampleName (the button's label in Sample Data), file, node name, Slicer file type, SHA-256 of the file
SAMPLES = (
    ("UniUltraCarotidUS", "CarotidUS.png", "UniUltraCarotidUS", "VolumeFile",
     "64d205de75d542a17ac9cec6d169eb870f7c2340c0e85ac0d80296a0e00bf684"),
    ("UniUltraCarotidCine", "CarotidCine.seq.nrrd", "UniUltraCarotidCine", "SequenceFile",
     "d4eaeff4c6368042f33556a9df4c6f470ea22e4b45c65bea0441f053254c4931"),
)


def repository_path(file_name: str) -> str:
    """The file's path in the repository (what the raw URL points at)."""
    return f"UniUltraSegment/Resources/SampleData/{file_name}"


def sample_uri(file_name: str, sample_dir: Path = SAMPLE_DIR) -> str:
    """The installed copy's file URI when it exists, else the raw URL of the file on `main`."""
    local = Path(sample_dir) / file_name
    return local.as_uri() if local.is_file() else REPOSITORY_RAW_URL + repository_path(file_name)


def sample_sources(sample_dir: Path = SAMPLE_DIR, icon: str | None = None) -> list[dict]:
    """Keyword arguments for `SampleDataLogic.registerCustomSampleDataSource`, one dict per sample."""
    if icon is None:
        icon = str(Path(sample_dir).parent / "Icons" / "UniUltraSegment.png")
    return [
        dict(category=CATEGORY, sampleName=name, uris=sample_uri(file_name, sample_dir), fileNames=file_name,
             nodeNames=node, thumbnailFileName=icon, loadFileType=file_type, checksums=f"SHA256:{sha256}")
        for name, file_name, node, file_type, sha256 in SAMPLES
    ]


def register_sample_data(sample_data_module=None, sample_dir: Path = SAMPLE_DIR) -> int:
    """Register the samples with Slicer's Sample Data module; returns how many were registered."""
    if sample_data_module is None:
        import SampleData as sample_data_module  # Slicer's scripted module, only inside Slicer
    sources = sample_sources(sample_dir)
    for kwargs in sources:
        sample_data_module.SampleDataLogic.registerCustomSampleDataSource(**kwargs)
    return len(sources)
