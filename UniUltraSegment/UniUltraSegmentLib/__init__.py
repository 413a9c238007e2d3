"""UniUltraSegment library: Qt-free MRML logic (controller, geometry, segments, sequences, models).

The library imports the engine's torch-free modules (``uniultra.fileio``, ``uniultra.data.dicom``,
``uniultra.errors``, ...; docs/ENGINE_API.md "Layers").  An installed extension has ``uniultra``
next to the modules; running from a source checkout, the checkout's root is put on ``sys.path``
here, before any of them is imported."""

from .engine import _add_source_tree_engine

_add_source_tree_engine()
