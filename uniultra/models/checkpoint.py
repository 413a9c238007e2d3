"""Checkpoints in Meta's format (``{"model": state_dict}``) plus UniUltra's own metadata.

A full checkpoint is ``{"model": sam.state_dict(), "uniultra": meta}`` and loads into Meta's own
``build_sam2`` when no adaptation was added.  An adapter-only checkpoint stores only the trained
parameters, ``{"trained": {...}, "uniultra": meta}``, where ``meta["base"]`` names the base
checkpoint (registry name or path) and its SHA-256, which is verified on load.
Loading is strict: a missing or unexpected key is an error that names the file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from uniultra.errors import InputError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_torch_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    from uniultra.data.io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def read_checkpoint(path: str | Path, expected_sha256: str | None = None) -> dict:
    """Load a checkpoint file with clear errors for missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist: check the path or run `uniultra models`")
    if expected_sha256:
        got = sha256_file(path)
        if got.lower() != expected_sha256.lower():
            raise InputError(
                f"checkpoint {path} has SHA-256 {got[:12]}..., expected {expected_sha256[:12]}...: "
                "the file is corrupt or incomplete; delete it and download it again"
            )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise InputError(
            f"checkpoint {path} cannot be read ({type(e).__name__}): the file is truncated or not a "
            "PyTorch checkpoint; download or save it again"
        ) from None
    if not isinstance(ckpt, dict) or not ("model" in ckpt or "trained" in ckpt):
        raise InputError(f"checkpoint {path} is not a SAM2 checkpoint: expected a dict with a 'model' entry")
    return ckpt


def load_state_strict(module: torch.nn.Module, sd: dict, source: str) -> None:
    """``load_state_dict`` with an error that names the file and the first offending keys."""
    result = module.load_state_dict(sd, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})")
    if problems:
        raise InputError(
            f"checkpoint {source} does not match the model architecture: {'; '.join(problems)}; "
            "choose the matching --model/architecture"
        )
    # shape mismatches raise inside load_state_dict; they are turned into InputError by callers


IMAGE_PATH_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")


def save_checkpoint(model, path: str | Path, meta: dict | None = None, half: bool = False,
                    trained_only: bool = False, image_only: bool = False) -> Path:
    """Save ``model`` (a UniUltraModel) atomically; ``half`` stores floats in fp16.

    ``image_only`` leaves out the video memory modules (for models whose memory was never
    trained, such as the bundled student): the file shrinks by half and loading rebuilds
    those modules untrained, which is what they were.
    """
    info = {
        "arch": model.arch.name,
        "image_size": model.image_size,
        "peft": model.peft,
        "name": model.name,
        **(meta or {}),
    }
    if getattr(model, "box_prior", 0.0) or getattr(model, "box_prior_round", None) is not None:
        info["box_prior"] = float(model.box_prior)
        if getattr(model, "box_prior_round", None) is not None:
            info["box_prior_round"] = float(model.box_prior_round)
    if trained_only:
        sd = {n: p.detach() for n, p in model.sam.named_parameters() if p.requires_grad}
        key = "trained"
        if "base" not in info:
            raise ValueError("an adapter-only checkpoint needs meta['base'] (the base model's name or path)")
    else:
        sd = model.sam.state_dict()
        key = "model"
        if image_only:
            sd = {k: v for k, v in sd.items() if k.startswith(IMAGE_PATH_PREFIXES)}
            info["image_only"] = True
            info["memory_trained"] = False
    sd = {k: (v.half() if half and v.is_floating_point() else v).cpu().clone() for k, v in sd.items()}
    atomic_torch_save({key: sd, "uniultra": info}, path)
    return Path(path)


def bundle_model(model, dst: str | Path, meta: dict, peft: str | None, description: str, license: str,
                 trained_only: bool = False, image_only: bool = False, before: str | None = None) -> dict:
    """Save ``model`` in fp16 as the bundled model ``model.name`` at ``dst`` (in
    ``Resources/models``) and put its registry entry, with the file's SHA-256, into the bundled
    registry (:func:`uniultra.registry.put_bundled_entry`).  ``peft`` is the entry's adaptation
    label.  Returns the entry.  Used by ``scripts/bundle_*.py``."""
    from uniultra.registry import put_bundled_entry

    dst = save_checkpoint(model, dst, {**meta, "name": model.name}, half=True, trained_only=trained_only,
                          image_only=image_only)
    entry = {"name": model.name, "arch": model.arch.name, "image_size": model.image_size,
             "description": description, "license": license, "url": None, "sha256": sha256_file(dst),
             "file": f"models/{dst.name}", "source": "bundled", "peft": peft,
             "params": sum(p.numel() for p in model.sam.parameters())}
    put_bundled_entry(entry, before)
    return entry
