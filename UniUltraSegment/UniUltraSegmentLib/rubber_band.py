"""The rectangle drawn while a box prompt is dragged (VTK only, no Qt, no MRML).

One copy for both front ends: the desktop effect (`SegmentEditorUniUltraLib/SegmentEditorEffect.py`,
one per slice view, added with ``scriptedEffect.addActor2D``) and the web effect
(`UniUltraWeb/uniultra_web/effect.py`, added to its pipeline's renderer).  Each front end adds
:attr:`RubberBand.actor` to its view and renders after :meth:`RubberBand.show` /
:meth:`RubberBand.hide` in its own way.
"""

from __future__ import annotations

import vtk

COLOUR = (1.0, 0.8, 0.0)


class RubberBand:
    """A closed 2D polyline in display coordinates (a ``vtkActor2D``), hidden until shown."""

    def __init__(self, line_width: float = 2.0, colour: tuple[float, float, float] = COLOUR):
        self.points = vtk.vtkPoints()
        self.points.SetNumberOfPoints(5)
        lines = vtk.vtkCellArray()
        lines.InsertNextCell(5)
        for i in range(5):
            lines.InsertCellPoint(i)
        self.poly = vtk.vtkPolyData()
        self.poly.SetPoints(self.points)
        self.poly.SetLines(lines)
        mapper = vtk.vtkPolyDataMapper2D()
        mapper.SetInputData(self.poly)
        self.actor = vtk.vtkActor2D()
        self.actor.SetMapper(mapper)
        self.actor.GetProperty().SetColor(*colour)
        self.actor.GetProperty().SetLineWidth(line_width)
        self.actor.VisibilityOff()

    def show(self, xy0, xy1) -> None:
        """The rectangle with corners ``xy0`` and ``xy1`` (display pixels), made visible."""
        (x0, y0), (x1, y1) = xy0, xy1
        for i, (x, y) in enumerate([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]):
            self.points.SetPoint(i, x, y, 0)
        self.points.Modified()
        self.poly.Modified()
        self.actor.VisibilityOn()

    def hide(self) -> bool:
        """Hide it; True when it was visible (the view needs a render)."""
        if not self.actor.GetVisibility():
            return False
        self.actor.VisibilityOff()
        return True
