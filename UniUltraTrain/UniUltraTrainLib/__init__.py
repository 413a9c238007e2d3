"""Qt-free logic of the UniUltraTrain module: curate datasets from the scene, run training.

Importing UniUltraSegmentLib first makes the engine's torch-free modules importable from a source
checkout too (see UniUltraSegmentLib/__init__.py)."""

import UniUltraSegmentLib  # noqa: F401
