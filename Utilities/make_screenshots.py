"""Regenerate the extension's screenshots (Resources/Screenshots/*.png) from the product itself.

What the pictures are, honestly: Slicer's own slice-view rendering (vtkMRMLSliceLogic reslicing
the volume, vtkMRMLSegmentationsDisplayableManager2D drawing the segment), run off-screen from
`slicer-core` (Slicer's Qt-free core from PyPI), not a capture of the Slicer application window.
The masks come from the bundled default model through the module's engine bridge
(`UniUltraSegmentLib.engine`: predict, propagate), written into the segment (for the cine: into
each frame of the segmentation sequence) with Slicer's Segmentations logic.  The dashed yellow rectangle is the box prompt, drawn on the render by this script.

Images: the module's sample data (common carotid artery, Momot 2022, CC BY 4.0) and one HC18 test
image (fetal head, CC BY 4.0) from the shared data.  The script also writes
`Resources/Screenshots/screenshots.json`: what each panel shows and its Dice against the expert
mask when the shared data is there.

    .venv/bin/python Utilities/make_screenshots.py [--data ../shared/data] [--out Resources/Screenshots]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "UniUltraSegment"))
sys.path.insert(0, str(REPO))

SAMPLE = REPO / "UniUltraSegment" / "Resources" / "SampleData"
from uniultra.registry import DEFAULT_MODEL as MODEL  # noqa: E402  (the bundled default)

# Box prompts (x0, y0, x1, y1 pixels, inclusive): the expert mask's bounding box widened by a few
# pixels, as a user would draw it.  Expert boxes: carotid 53 135 120 196 (CarotidUS.png =
# carotid/images/202201121748100022VAS_01069.png), cine frame 0 239 106 296 158
# (202201121752220024VAS_00599.png).
CAROTID_BOX = (48, 130, 125, 201)
CINE_BOX = (234, 101, 301, 163)
CINE_FRAMES = [f"202201121752220024VAS_{n}" for n in "00599 00603 00646 00657 00668 00691 00693 00699 00713 00721".split()]
HC18_ID = "005_HC"
SEGMENT_COLOR = (0.2, 0.85, 0.55)  # fixed, so a regenerated picture differs only where the product does
VIEW_SIZE = (363, 384)  # one slice view, pixels (the sample image's own size: one screen pixel per image pixel)


# ------------------------------------------------------------------ Slicer slice view, off-screen

class SliceView:
    """One slice view: Slicer's slice logic + the 2D segmentation displayable manager in an
    off-screen render window (what qMRMLSliceWidget wires up, minus Qt)."""

    def __init__(self, ctx, size=VIEW_SIZE, name="Red"):
        import slicer
        import vtk

        self.size = size
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetMultiSamples(0)
        self.window.SetSize(*size)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()  # displayable managers observe it
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(ctx.app_logic)
        if not factory.IsDisplayableManagerRegistered("vtkMRMLSegmentationsDisplayableManager2D"):
            factory.RegisterDisplayableManager("vtkMRMLSegmentationsDisplayableManager2D")
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(ctx.app_logic)
        if ctx.app_logic.GetSliceLogics() is None:
            ctx.app_logic.SetSliceLogics(vtk.vtkCollection())
        ctx.app_logic.GetSliceLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(ctx.scene)
        self.node = self.logic.AddSliceNode(name)
        # Axial, as Slicer's Red view: screen right = patient left, screen up = anterior
        axial = np.array([[-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
        for r in range(4):
            for c in range(4):
                self.node.GetSliceToRAS().SetElement(r, c, axial[r, c])
        self.node.UpdateMatrices()
        self.managers.SetMRMLDisplayableNode(self.node)

        # the blended slice image (background volume through its window/level, as RGBA 0-255)
        self.mapper = vtk.vtkImageMapper()
        self.mapper.SetColorWindow(255)
        self.mapper.SetColorLevel(127.5)
        actor = vtk.vtkActor2D()
        actor.SetMapper(self.mapper)
        actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(actor)

    def show(self, volume_node) -> None:
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
        self.logic.ResizeSliceNode(*self.size)
        self.logic.FitSliceToBackground()
        self.logic.SnapSliceOffsetToIJK()

    def slice_to_ras(self) -> np.ndarray:
        from UniUltraSegmentLib.geometry import vtk_matrix_to_numpy

        return vtk_matrix_to_numpy(self.node.GetSliceToRAS())

    def xy_of_ras(self, ras) -> tuple[float, float]:
        """Screen pixel (x right, y down) of a RAS point, through the slice node's XYToRAS."""
        from UniUltraSegmentLib.geometry import vtk_matrix_to_numpy

        xy_to_ras = vtk_matrix_to_numpy(self.node.GetXYToRAS())
        xy = np.linalg.inv(xy_to_ras) @ np.r_[np.asarray(ras, float)[:3], 1.0]
        return float(xy[0]), float(self.size[1] - 1 - xy[1])

    def render(self) -> Image.Image:
        import vtk
        from vtk.util import numpy_support

        self.mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        img = grab.GetOutput()
        w, h, _ = img.GetDimensions()
        arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, 3)
        return Image.fromarray(np.ascontiguousarray(arr[::-1]))


def draw_box(image: Image.Image, view: SliceView, ijk_to_ras: np.ndarray, box, color=(255, 210, 0)) -> None:
    """The box prompt (pixel corners, pixel = IJK i, j of the 2D frame) where the view shows it, dashed."""
    x0, y0, x1, y1 = box
    a = view.xy_of_ras((ijk_to_ras @ [x0 - 0.5, y0 - 0.5, 0, 1])[:3])
    b = view.xy_of_ras((ijk_to_ras @ [x1 + 0.5, y1 + 0.5, 0, 1])[:3])
    left, right = sorted((a[0], b[0]))
    top, bottom = sorted((a[1], b[1]))
    d = ImageDraw.Draw(image)
    dash = 6
    for x in np.arange(left, right, 2 * dash):
        d.line([(x, top), (min(x + dash, right), top)], fill=color, width=2)
        d.line([(x, bottom), (min(x + dash, right), bottom)], fill=color, width=2)
    for y in np.arange(top, bottom, 2 * dash):
        d.line([(left, y), (left, min(y + dash, bottom))], fill=color, width=2)
        d.line([(right, y), (right, min(y + dash, bottom))], fill=color, width=2)


def label(image: Image.Image, text: str) -> Image.Image:
    """The panel with a one-line caption bar under it."""
    out = Image.new("RGB", (image.width, image.height + 18), (30, 30, 30))
    out.paste(image, (0, 0))
    ImageDraw.Draw(out).text((4, image.height + 3), text, fill=(235, 235, 235))
    return out


def montage(panels: list[Image.Image], gap: int = 4) -> Image.Image:
    h = max(p.height for p in panels)
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), h), (0, 0, 0))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


# ------------------------------------------------------------------ scenes

def grey_display(ctx, volume_node) -> None:
    """The grey colour table and a 0-255 window, as Slicer shows an 8-bit ultrasound image."""
    import slicer

    if ctx.scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
        colors = slicer.vtkMRMLColorLogic()  # adds Slicer's default colour nodes to the scene
        colors.SetMRMLScene(ctx.scene)
        ctx.colors = colors
    if volume_node.GetDisplayNode() is None:
        volume_node.CreateDefaultDisplayNodes()
    display = volume_node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0, 255)


def load_png_volume(ctx, path: Path, name: str):
    """A PNG as Slicer lays out a loaded 2D image (LPS axes, upright in the Red view), through the
    module's own `volume_from_frame` (slicer-core has no PNG reader registered)."""
    from UniUltraSegmentLib.sequences import volume_from_frame

    node = volume_from_frame(np.array(Image.open(path).convert("L")), name=name)
    ctx.scene.AddNode(node)
    grey_display(ctx, node)
    return node


def frame_of(volume_node) -> np.ndarray:
    """The single-slice volume's image as (rows, cols) = (j, i): what the Red view shows upright."""
    from UniUltraSegmentLib.geometry import volume_array

    return np.array(volume_array(volume_node)[0])


def write_mask(seg_node, segment_id: str, volume_node, mask: np.ndarray) -> None:
    """The mask into the segment with Slicer's own Segmentations logic (replace mode)."""
    import slicer
    from UniUltraSegmentLib.geometry import ijk_to_ras_of
    from UniUltraSegmentLib.segments import oriented_image_from_array

    labelmap = oriented_image_from_array(mask[None].astype(np.uint8), ijk_to_ras_of(volume_node))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, seg_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)


def segmented_view(ctx, predictor, image_path: Path, box, name: str):
    """Load, box, predict, write the segment; return (render, mask, frame)."""
    from UniUltraSegmentLib.engine import predict_mask
    from UniUltraSegmentLib.geometry import ijk_to_ras_of
    from UniUltraSegmentLib.segments import create_segmentation_for, get_or_add_segment

    volume = load_png_volume(ctx, image_path, name)
    view = SliceView(ctx)
    view.show(volume)
    seg = create_segmentation_for(ctx, volume)
    sid = get_or_add_segment(seg, "UniUltra", SEGMENT_COLOR)
    frame = frame_of(volume)
    mask = predict_mask(predictor, frame, boxes=[box])
    write_mask(seg, sid, volume, mask)
    image = view.render()
    draw_box(image, view, ijk_to_ras_of(volume), box)
    return image, mask, frame


def expert_mask(data: Path | None, dataset: str, image_id: str, frame: np.ndarray) -> np.ndarray | None:
    """The dataset's expert mask, only if its image is pixel-identical to the frame we segmented."""
    if data is None:
        return None
    img_p, mask_p = data / dataset / "images" / f"{image_id}.png", data / dataset / "masks" / f"{image_id}.png"
    if not (img_p.exists() and mask_p.exists()):
        return None
    if not np.array_equal(np.array(Image.open(img_p)), frame):
        return None
    return np.array(Image.open(mask_p)) > 0


def make_segment_png(new_context, predictor, data: Path | None, out: Path, record: dict) -> None:
    panels = []
    image, mask, frame = segmented_view(new_context(), predictor, SAMPLE / "CarotidUS.png", CAROTID_BOX, "CarotidUS")
    gt = expert_mask(data, "carotid", "202201121748100022VAS_01069", frame)
    d = None if gt is None else round(dice(mask, gt), 3)
    record["segment.png"] = [{
        "image": "UniUltraSegment/Resources/SampleData/CarotidUS.png (sample data; carotid, Momot 2022, CC BY 4.0)",
        "box": list(CAROTID_BOX), "model": MODEL, "dice_vs_expert": d}]
    panels.append(label(image, f"carotid sample, one box: Dice {d}" if d is not None else "carotid sample, one box"))
    if data is not None and (data / "hc18" / "images" / f"{HC18_ID}.png").exists():
        gt = np.array(Image.open(data / "hc18" / "masks" / f"{HC18_ID}.png")) > 0
        ys, xs = np.nonzero(gt)
        box = (int(xs.min()) - 6, int(ys.min()) - 6, int(xs.max()) + 6, int(ys.max()) + 6)
        image, mask, _ = segmented_view(new_context(), predictor, data / "hc18" / "images" / f"{HC18_ID}.png", box, "HC18")
        d = round(dice(mask, gt), 3)
        record["segment.png"].append({
            "image": f"hc18/images/{HC18_ID}.png (HC18 test split, CC BY 4.0)",
            "box": list(box), "model": MODEL, "dice_vs_expert": d})
        panels.append(label(image, f"HC18 fetal head (test), one box: Dice {d}"))
    montage(panels).save(out / "segment.png", optimize=True)


def make_propagate_png(ctx, predictor, data: Path | None, out: Path, record: dict) -> None:
    """Tutorial step 3 on the sample cine, which jumps between sparse acquisition frames (the
    artery moves by about its width between frames 2 and 3): one box on frame 1, propagated
    forward.  Two rows: boxes chained in place (``motion="none"``, what propagation did before
    it followed motion), then the effect's own propagation through the engine bridge, which
    moves each box by the image's motion."""
    from UniUltraSegmentLib.engine import make_propagate
    from UniUltraSegmentLib.geometry import ijk_to_ras_of
    from UniUltraSegmentLib.sequences import ensure_segmentation_sequence, load_sequence_file

    from uniultra.inference import propagate as engine_propagate

    cine = load_sequence_file(ctx, SAMPLE / "CarotidCine.seq.nrrd")
    grey_display(ctx, cine.proxy)
    view = SliceView(ctx)
    cine.select(0)
    view.show(cine.proxy)
    import slicer
    from UniUltraSegmentLib.segments import get_or_add_segment

    seg = slicer.vtkMRMLSegmentationNode()
    ctx.scene.AddNode(seg)
    seg.CreateDefaultDisplayNodes()
    get_or_add_segment(seg, "UniUltra", SEGMENT_COLOR)
    seg, sid = ensure_segmentation_sequence(ctx, cine, seg_node=seg, segment_name="UniUltra")
    frames = [frame_of(cine.sequence.GetNthDataNode(i)) for i in range(cine.num_frames)]
    gts = [expert_mask(data, "carotid", CINE_FRAMES[i], f) for i, f in enumerate(frames)]
    effect_propagate = make_propagate(predictor)
    runs = (("boxes chained in place", lambda: engine_propagate(predictor, frames, {0: [CINE_BOX]},
                                                                direction="forward", motion="none")),
            ("follows motion (default)", lambda: effect_propagate(frames, {0: [CINE_BOX]}, direction="forward")))
    shown = (0, 1, 2, 5, 9)
    rows, passes = [], []
    for title, run in runs:
        masks = run()
        current = [np.asarray(m, bool) if m is not None else np.zeros(f.shape, bool) for m, f in zip(masks, frames)]
        for i, m in enumerate(current):
            cine.select(i)  # the proxy segmentation now stands for frame i; the browser saves edits into it
            write_mask(seg, sid, cine.proxy, m)
        dices = [None if gt is None else round(dice(m, gt), 3) for m, gt in zip(current, gts)]
        panels = []
        for i in shown:
            cine.select(i)
            image = view.render()
            if i == 0:
                draw_box(image, view, ijk_to_ras_of(cine.proxy), CINE_BOX)
            text = f"frame {i + 1}/{cine.num_frames}" + (" (box)" if i == 0 else "")
            if dices[i] is not None:
                text += f": Dice {dices[i]}"
            if i == 0:
                text = f"{title} | {text}"
            panels.append(label(image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS), text))
        rows.append(montage(panels))
        later = [d for d in dices[1:] if d is not None]
        passes.append({"propagation": title, "frames_shown": [i + 1 for i in shown],
                       "dice_vs_expert_per_frame": dices,
                       "mean_dice_frames_2_to_10": round(float(np.mean(later)), 3) if later else None})
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows) + 4), (0, 0, 0))
    sheet.paste(rows[0], (0, 0))
    sheet.paste(rows[1], (0, rows[0].height + 4))
    sheet.save(out / "propagate.png", optimize=True)
    record["propagate.png"] = {
        "image": "UniUltraSegment/Resources/SampleData/CarotidCine.seq.nrrd (sample data; carotid, Momot 2022, CC BY 4.0)",
        "model": MODEL, "box_frame": 1, "box": list(CINE_BOX), "direction": "forward",
        "top_row": passes[0], "bottom_row": passes[1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("UNIULTRA_DATA", REPO.parent / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=default_data, help="shared data (for HC18 and the Dice numbers)")
    ap.add_argument("--out", type=Path, default=REPO / "Resources" / "Screenshots")
    args = ap.parse_args(argv)
    data = args.data if args.data.exists() else None
    args.out.mkdir(parents=True, exist_ok=True)

    import vtk
    from UniUltraSegmentLib.context import create_context
    from UniUltraSegmentLib.engine import load_predictor

    vtk.vtkObject.GlobalWarningDisplayOff()
    predictor = load_predictor(MODEL, "cpu")
    record: dict = {
        "rendering": "Slicer slice view (vtkMRMLSliceLogic + vtkMRMLSegmentationsDisplayableManager2D) "
                     "from slicer-core, off-screen; not a capture of the Slicer application window",
        "made_by": "Utilities/make_screenshots.py",
    }
    make_segment_png(create_context, predictor, data, args.out, record)
    make_propagate_png(create_context(), predictor, data, args.out, record)
    (args.out / "screenshots.json").write_text(json.dumps(record, indent=2) + "\n")
    for name in ("segment.png", "propagate.png"):
        p = args.out / name
        print(f"{p.relative_to(REPO) if p.is_relative_to(REPO) else p}: {Image.open(p).size}, {p.stat().st_size // 1024} KB")
    print(json.dumps({k: v for k, v in record.items() if k.endswith(".png")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
