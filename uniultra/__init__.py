"""UniUltra engine: SAM2 + CH-Adapter for ultrasound. Never imports slicer, vtk or Qt."""

__version__ = "0.1.0"
