"""Slice-view geometry: which voxels a slice view shows, as a 2D numpy frame.

A slice view in Slicer is a plane given by its SliceToRAS matrix (columns: the view's x
direction, y direction, normal, and a point on the plane).  Ultrasound images are
single-slice volumes, colour images are RGB vector volumes, 3D ultrasound is a scalar volume
whose IJKToRAS matrix may permute, flip and scale the axes.  The engine wants a plain
(H, W) or (H, W, 3) image and box/point prompts in its pixel coordinates, so this module
computes, for a volume and a view:

* the volume axis the view looks along and the slice index it shows (pixel-exact, by
  rounding the plane position to the nearest voxel centre, as Slicer's reslicing does);
* the 2D frame oriented as on screen: columns follow the view's x axis (left to right),
  rows follow the view's -y axis (top to bottom);
* an exact affine map between frame pixels (col, row) and IJK, hence RAS.

No Qt, no scene required: only the volume node's matrices and image data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError, require_node

# A view is "aligned" with a volume axis when the angle between them is below ~0.5 degree.
ALIGN_TOLERANCE = 1e-4


def vtk_matrix_to_numpy(matrix) -> np.ndarray:
    """Copy a vtkMatrix4x4 into a (4, 4) float array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def numpy_to_vtk_matrix(m: np.ndarray):
    """A vtkMatrix4x4 from a (4, 4) array."""
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def ijk_to_ras_of(volume_node) -> np.ndarray:
    """The volume's IJKToRAS as a (4, 4) array (parent transforms are not applied)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return vtk_matrix_to_numpy(m)


def parent_to_world(node) -> np.ndarray:
    """(4, 4) node-local -> world matrix of `node`'s parent transforms (identity without one).

    Slice views show nodes in world coordinates, so a transformed volume's voxels are where
    parent_to_world @ IJKToRAS puts them.  A non-linear transform raises a ValueError: pixel-exact
    frames and prompts need a linear one (harden the transform first)."""
    import vtk

    transform = node.GetParentTransformNode() if node is not None else None
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise ValueError(
            f"'{node.GetName()}' is under the non-linear transform '{transform.GetName()}': UniUltra works on "
            "linearly placed images only. Harden the transform (Data module) and try again."
        )
    m = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(m)
    return vtk_matrix_to_numpy(m)


def world_ijk_to_ras(volume_node) -> np.ndarray:
    """IJK -> world RAS of a volume, parent transforms included (what the slice views show)."""
    return parent_to_world(volume_node) @ ijk_to_ras_of(volume_node)


def volume_array(volume_node) -> np.ndarray:
    """Voxels of a scalar or vector volume as a numpy view, shape (K, J, I) or (K, J, I, C)."""
    from vtk.util import numpy_support

    require_node(volume_node, "vtkMRMLVolumeNode", "volume")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume '{volume_node.GetName()}' has no image data: load an image first")
    dims = image.GetDimensions()
    ncomp = image.GetNumberOfScalarComponents()
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    shape = (dims[2], dims[1], dims[0]) + ((ncomp,) if ncomp > 1 else ())
    return arr.reshape(shape)


def volume_node(arr: np.ndarray, ijk_to_ras: np.ndarray | None = None, name: str = "volume", rgb: bool | None = None):
    """The one builder of a volume node from voxels (not added to a scene): a scalar volume from
    (K, J, I), a vector volume from (K, J, I, C) (``rgb`` defaults to "has a component axis").

    ``ijk_to_ras`` defaults to how Slicer loads a 2D image (LPS axes, spacing 1), which shows the
    image upright in the Red (axial) view."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    arr = np.ascontiguousarray(arr)
    if arr.ndim not in (3, 4) or 0 in arr.shape:
        raise InputError(f"voxels of shape {arr.shape}: give a non-empty (K, J, I) or (K, J, I, C) array")
    rgb = arr.ndim == 4 if rgb is None else rgb
    node = slicer.vtkMRMLVectorVolumeNode() if rgb else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    image = vtk.vtkImageData()
    k, j, i = arr.shape[:3]
    image.SetDimensions(i, j, k)
    ncomp = arr.shape[3] if arr.ndim == 4 else 1
    image.AllocateScalars(numpy_support.get_vtk_array_type(arr.dtype), ncomp)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = arr.reshape(-1, ncomp).squeeze()
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(numpy_to_vtk_matrix(np.diag([-1.0, -1.0, 1.0, 1.0]) if ijk_to_ras is None else ijk_to_ras))
    return node


@dataclass(frozen=True)
class SliceGeometry:
    """How a slice view cuts a volume.

    axis: the IJK axis (0=I, 1=J, 2=K) the view looks along; index: the slice shown.
    col_axis / row_axis: the IJK axes that run along frame columns (x) and rows (y);
    col_flip / row_flip: True when the IJK index decreases as the frame coordinate grows.
    dims: the volume's (I, J, K) dimensions; ijk_to_ras: the volume's (4, 4) IJK -> world RAS
    (parent transforms included).
    """

    axis: int
    index: int
    col_axis: int
    row_axis: int
    col_flip: bool
    row_flip: bool
    dims: tuple[int, int, int]
    ijk_to_ras: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """Frame (H, W)."""
        return (self.dims[self.row_axis], self.dims[self.col_axis])

    def pixel_to_ijk_matrix(self, index: int | None = None) -> np.ndarray:
        """(4, 4) affine mapping (col, row, 0, 1) to (i, j, k, 1) on slice `index` (default: shown).

        The third coordinate counts slices from `index` along the view axis, so the matrix is invertible.
        """
        m = np.zeros((4, 4))
        m[3, 3] = 1.0
        h, w = self.shape
        if self.col_flip:
            m[self.col_axis, 0] = -1.0
            m[self.col_axis, 3] = w - 1
        else:
            m[self.col_axis, 0] = 1.0
        if self.row_flip:
            m[self.row_axis, 1] = -1.0
            m[self.row_axis, 3] = h - 1
        else:
            m[self.row_axis, 1] = 1.0
        m[self.axis, 2] = 1.0  # third pixel coordinate: slices away from `index`
        m[self.axis, 3] = self.index if index is None else index
        return m

    def pixel_to_ras_matrix(self, index: int | None = None) -> np.ndarray:
        return self.ijk_to_ras @ self.pixel_to_ijk_matrix(index)

    def pixel_to_ijk(self, col: float, row: float) -> np.ndarray:
        return (self.pixel_to_ijk_matrix() @ np.array([col, row, 0.0, 1.0]))[:3]

    def pixel_to_ras(self, col: float, row: float) -> np.ndarray:
        return (self.pixel_to_ras_matrix() @ np.array([col, row, 0.0, 1.0]))[:3]

    def ras_to_pixel(self, ras) -> np.ndarray:
        """RAS point -> (col, row) float frame coordinates (the point is projected on the slice)."""
        ijk = np.linalg.inv(self.ijk_to_ras) @ np.array([*np.asarray(ras, float)[:3], 1.0])
        p = np.linalg.inv(self.pixel_to_ijk_matrix()) @ np.array([ijk[0], ijk[1], ijk[2], 1.0])
        return p[:2]

    def ras_to_pixel_int(self, ras) -> tuple[int, int]:
        """RAS point -> the (col, row) pixel that contains it, clamped to the frame."""
        c, r = np.floor(self.ras_to_pixel(ras) + 0.5).astype(int)
        h, w = self.shape
        return int(np.clip(c, 0, w - 1)), int(np.clip(r, 0, h - 1))

    def ras_box_to_pixel_box(self, ras_a, ras_b) -> tuple[int, int, int, int]:
        """Two opposite RAS corners (e.g. a click-drag) -> (x0, y0, x1, y1), corners inclusive."""
        c0, r0 = self.ras_to_pixel_int(ras_a)
        c1, r1 = self.ras_to_pixel_int(ras_b)
        return (min(c0, c1), min(r0, r1), max(c0, c1), max(r0, r1))

    def frame_from_array(self, arr: np.ndarray, index: int | None = None) -> np.ndarray:
        """Cut slice `index` (default: shown) out of a (K, J, I[, C]) array, oriented as on screen."""
        idx = self.index if index is None else index
        # numpy axis of IJK axis a is 2 - a
        sl: list = [slice(None)] * 3
        sl[2 - self.axis] = idx
        plane = arr[tuple(sl)]
        # remaining numpy axes in order: the two in-plane IJK axes, higher IJK axis first
        remaining = [a for a in (2, 1, 0) if a != self.axis]
        order = [remaining.index(self.row_axis), remaining.index(self.col_axis)]
        if plane.ndim == 3:
            order.append(2)
        frame = np.transpose(plane, order)
        if self.row_flip:
            frame = frame[::-1]
        if self.col_flip:
            frame = frame[:, ::-1]
        return np.ascontiguousarray(frame)

    def array_from_frame(self, frame: np.ndarray) -> np.ndarray:
        """Inverse of frame_from_array for a single slice: (H, W) -> in-plane (a, b) in numpy order.

        Returns the 2D plane laid out as the volume's numpy array slice (rows = higher IJK
        in-plane axis), so that `arr[sl] = array_from_frame(mask)` writes it back.
        """
        f = np.asarray(frame)
        if f.shape[:2] != self.shape:
            raise ValueError(f"mask shape {f.shape[:2]} does not match the slice shape {self.shape}")
        if self.row_flip:
            f = f[::-1]
        if self.col_flip:
            f = f[:, ::-1]
        remaining = [a for a in (2, 1, 0) if a != self.axis]
        if remaining[0] == self.row_axis:
            return np.ascontiguousarray(f)
        return np.ascontiguousarray(f.T)

    def frames_from_array(self, arr: np.ndarray) -> list[np.ndarray]:
        """All slices along the view axis, oriented as on screen (for propagation through a 3D volume)."""
        return [self.frame_from_array(arr, k) for k in range(self.dims[self.axis])]


def _best_axis(direction_ijk: np.ndarray) -> tuple[int, float]:
    d = direction_ijk / np.linalg.norm(direction_ijk)
    a = int(np.argmax(np.abs(d)))
    return a, float(d[a])


def slice_geometry(volume_node, slice_to_ras, slice_offset: float | None = None) -> SliceGeometry:
    """Work out which slice of `volume_node` a view with `slice_to_ras` shows.

    slice_to_ras: (4, 4) array or vtkMatrix4x4 (a slice node's SliceToRAS).  slice_offset:
    the distance of the plane from the origin along the view normal (a slice node's
    GetSliceOffset()); by default taken from the matrix.  Raises ValueError with a message
    for the user when the view is oblique to the volume, shows a single-slice image edge-on,
    or lies outside the volume.
    """
    require_node(volume_node, "vtkMRMLVolumeNode", "volume")
    if not isinstance(slice_to_ras, np.ndarray):
        slice_to_ras = vtk_matrix_to_numpy(slice_to_ras)
    s2r = np.asarray(slice_to_ras, float)
    if s2r.shape != (4, 4) or not np.isfinite(s2r).all() or abs(np.linalg.det(s2r[:3, :3])) < 1e-12:
        raise InputError("the view's SliceToRAS is not a finite, invertible 4x4 matrix: reset the slice view")
    name = volume_node.GetName() or "volume"
    image = volume_node.GetImageData()
    if image is None:
        raise InputError(f"volume '{name}' has no image data: load an image first")
    dims = tuple(int(d) for d in image.GetDimensions())
    m = world_ijk_to_ras(volume_node)
    a3 = m[:3, :3]
    normal = s2r[:3, 2] / np.linalg.norm(s2r[:3, 2])
    # plane n.p = offset in RAS  ->  (A^T n).ijk = offset - n.b in IJK
    n_ijk = a3.T @ normal
    axis, comp = _best_axis(n_ijk)
    cos = abs(comp)
    if 1.0 - cos > ALIGN_TOLERANCE:
        raise ValueError(
            f"The slice view is oblique to the image '{name}' (tilted by "
            f"{np.degrees(np.arccos(min(cos, 1.0))):.1f} degrees): UniUltra segments the image's own "
            "slices. Reset the view orientation (slice view menu > 'Reset field of view' / "
            "'Rotate to volume plane') and try again."
        )
    offset = float(normal @ s2r[:3, 3]) if slice_offset is None else float(slice_offset)
    pos = (offset - normal @ m[:3, 3]) / n_ijk[axis]
    index = int(np.floor(pos + 0.5))
    if dims[axis] == 1:
        # a 2D image: Slicer snaps the view to it; a small drift of the offset still means "this image"
        index = 0
    if not 0 <= index < dims[axis]:
        raise ValueError(
            f"The slice view is outside the image '{name}' (slice {pos:.1f} of 0..{dims[axis] - 1}): "
            "move the slice into the image."
        )
    in_plane = [a for a in range(3) if a != axis]
    if any(dims[a] == 1 for a in in_plane):
        raise ValueError(
            f"The image '{name}' is seen edge-on in this slice view: show it in the view where it "
            "lies flat (for a 2D image, usually the Red/axial view)."
        )
    # in-plane axes: columns follow the view x, rows follow the view -y
    x_ijk = np.linalg.solve(a3, s2r[:3, 0])
    y_ijk = np.linalg.solve(a3, -s2r[:3, 1])
    x_ijk[axis] = 0.0
    y_ijk[axis] = 0.0
    col_axis, col_comp = _best_axis(x_ijk)
    row_axis = in_plane[0] if in_plane[1] == col_axis else in_plane[1]
    row_comp = y_ijk[row_axis]
    return SliceGeometry(
        axis=axis,
        index=index,
        col_axis=col_axis,
        row_axis=row_axis,
        col_flip=col_comp < 0,
        row_flip=row_comp < 0,
        dims=dims,  # type: ignore[arg-type]
        ijk_to_ras=m,
    )


def extract_frame(volume_node, geometry: SliceGeometry, index: int | None = None) -> np.ndarray:
    """The 2D frame (H, W) or (H, W, C) a view shows, as a copy."""
    if index is not None:
        n = geometry.dims[geometry.axis]
        if not 0 <= int(index) < n:
            raise InputError(f"slice {index} is outside volume '{volume_node.GetName()}' (slices 0..{n - 1})")
    return geometry.frame_from_array(volume_array(volume_node), index)
