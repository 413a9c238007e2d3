"""The UniUltra Segment Editor effect (Qt), in its own folder as in Slicer's effect template.

Slicer loads SegmentEditorEffect.py *as* the module `SegmentEditorUniUltraLib` (the folder name);
importing this package normally gives the same class.
"""

from .SegmentEditorEffect import SegmentEditorEffect  # noqa: F401
