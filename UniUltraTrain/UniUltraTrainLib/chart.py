"""The live training chart as MRML plot nodes (no Qt): loss and validation Dice against the step.

Two table nodes (the loss is logged every few steps, the Dice at validations), two scatter
series and one chart node.  The module shows the chart in a `qMRMLPlotView`; tests check the
tables on slicer-core.  The nodes are hidden from the data tree and saved with the scene only
if the user wants them (`SetSaveWithScene(False)` by default).
"""

from __future__ import annotations

from dataclasses import dataclass

COLUMNS = {"loss": ("step", "train loss"), "val_dice": ("step", "val Dice")}
COLORS = {"loss": (0.12, 0.47, 0.71), "val_dice": (0.84, 0.15, 0.16)}


def _fill_table(table_node, series: list[tuple[int, float]], names: tuple[str, str]) -> None:
    import vtk

    table = table_node.GetTable()
    x = vtk.vtkDoubleArray()
    x.SetName(names[0])
    y = vtk.vtkDoubleArray()
    y.SetName(names[1])
    for step, value in series:
        x.InsertNextValue(float(step))
        y.InsertNextValue(float(value))
    table.Initialize()
    table.AddColumn(x)
    table.AddColumn(y)
    table.Modified()
    table_node.Modified()


@dataclass
class TrainingChart:
    chart: object
    tables: dict
    series: dict

    @classmethod
    def create(cls, scene, name: str = "UniUltra training") -> TrainingChart:
        import slicer

        tables, series = {}, {}
        chart = slicer.vtkMRMLPlotChartNode()
        chart.SetName(name)
        chart.SetSaveWithScene(False)
        scene.AddNode(chart)
        for key, (xname, yname) in COLUMNS.items():
            t = slicer.vtkMRMLTableNode()
            t.SetName(f"{name} {yname}")
            t.SetHideFromEditors(True)
            t.SetSaveWithScene(False)
            scene.AddNode(t)
            _fill_table(t, [], (xname, yname))
            s = slicer.vtkMRMLPlotSeriesNode()
            s.SetName(yname)
            s.SetSaveWithScene(False)
            scene.AddNode(s)
            s.SetAndObserveTableNodeID(t.GetID())
            s.SetXColumnName(xname)
            s.SetYColumnName(yname)
            s.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            s.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if key == "val_dice"
                             else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            s.SetColor(*COLORS[key])
            chart.AddAndObservePlotSeriesNodeID(s.GetID())
            tables[key], series[key] = t, s
        chart.SetTitle("Training: loss and validation Dice")
        chart.SetXAxisTitle("optimiser step")
        chart.SetYAxisTitle("loss / Dice")
        chart.SetLegendVisibility(True)
        return cls(chart, tables, series)

    def update(self, metrics: dict) -> None:
        """Refill the tables from `runner.read_metrics(...)` output."""
        for key, (xname, yname) in COLUMNS.items():
            _fill_table(self.tables[key], list(metrics.get(key, [])), (xname, yname))

    def values(self, key: str) -> list[tuple[float, float]]:
        t = self.tables[key].GetTable()
        if t.GetNumberOfColumns() < 2:
            return []
        x, y = t.GetColumn(0), t.GetColumn(1)
        return [(x.GetValue(i), y.GetValue(i)) for i in range(t.GetNumberOfRows())]

    def remove(self, scene) -> None:
        for node in [self.chart, *self.series.values(), *self.tables.values()]:
            if node.GetScene() is not None:
                scene.RemoveNode(node)
