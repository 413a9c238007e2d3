"""Promptable prediction with an embedding cache, and propagation through frames."""

from uniultra.inference.predictor import DEFAULT_MODEL, Prediction, Predictor, pick_device
from uniultra.inference.propagation import propagate, propagate_memory

__all__ = ["Predictor", "Prediction", "propagate", "propagate_memory", "pick_device", "DEFAULT_MODEL"]
