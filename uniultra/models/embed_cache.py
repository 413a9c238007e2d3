"""A disk cache of image embeddings for models whose image encoder does not train.

LiteMedSAM's TinyViT costs about a second per image on a 2-core CPU, its decoder 60 ms: when
only the decoder trains (or the encoder is a frozen DSKD teacher), every epoch would recompute
the same embeddings.  ``attach(model, folder)`` makes ``model.encode`` look each image up by a
hash of its exact model input, so training, validation, distillation and evaluation reuse one
cache without knowing about it; ``fill`` computes missing entries up front (optionally through
ONNX Runtime, about twice as fast as eager PyTorch on the CPU), resumably and with progress.

Entries live in ``<folder>/<encoder fingerprint>/<key[:2]>/<key>.pt`` (fp16): the fingerprint is
a hash of the image encoder's weights, so a cache can never serve embeddings of another
encoder, and a run that trains the encoder is refused.
"""

from __future__ import annotations

import hashlib
import logging
import types
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from uniultra.errors import Cancelled, InputError

log = logging.getLogger(__name__)


def encoder_fingerprint(model) -> str:
    """Hash of the image encoder's parameters and buffers (names, shapes and values)."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in sorted(model.sam.image_encoder.state_dict().items()):
        h.update(name.encode())
        a = t.detach().cpu().contiguous()
        h.update(str(tuple(a.shape)).encode())
        h.update(a.numpy().tobytes() if a.dtype != torch.bfloat16 else a.float().numpy().tobytes())
    return h.hexdigest()


def input_key(x: torch.Tensor) -> str:
    """Hash of one model input ``[3, S, S]`` (exact float32 bytes)."""
    return hashlib.blake2b(x.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


class EmbeddingCache:
    def __init__(self, folder, fingerprint: str):
        self.root = Path(folder).expanduser() / fingerprint
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed
            log.warning("embedding cache entry %s is unreadable; recomputing it", p)
            return None

    def put(self, key: str, emb_row: dict) -> None:
        from uniultra.models.checkpoint import atomic_torch_save

        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(_to_store(emb_row), p)


def _to_store(emb_row: dict) -> dict:
    """One image's embedding dict -> fp16 CPU tensors (the FPN list is kept only when it holds
    more than the decoder's own inputs)."""
    def h(t):
        return t.detach().half().cpu().clone()

    out = {"image_embed": h(emb_row["image_embed"])}
    if emb_row.get("high_res_feats") is not None:
        out["high_res_feats"] = [h(t) for t in emb_row["high_res_feats"]]
    fpn = emb_row.get("fpn")
    if fpn is not None and not (len(fpn) == 1 and fpn[0] is emb_row["image_embed"]):
        out["fpn"] = [h(t) for t in fpn]
    return out


def _stack(rows: list[dict], device, dtype) -> dict:
    def cat(ts):
        return torch.stack(ts).to(device=device, dtype=dtype)

    emb = {"image_embed": cat([r["image_embed"] for r in rows])}
    hr = rows[0].get("high_res_feats")
    emb["high_res_feats"] = None if hr is None else [cat([r["high_res_feats"][k] for r in rows])
                                                     for k in range(len(hr))]
    if all("fpn" in r for r in rows):  # rows without it carry only image_embed (see _to_store)
        emb["fpn"] = [cat([r["fpn"][k] for r in rows]) for k in range(len(rows[0]["fpn"]))]
    else:
        emb["fpn"] = [emb["image_embed"]]
    return emb


def _rows(emb: dict, i: int) -> dict:
    ie = emb["image_embed"][i]  # one object, so that _to_store sees an FPN that is only the embedding
    out = {"image_embed": ie}
    if emb.get("high_res_feats") is not None:
        out["high_res_feats"] = [t[i] for t in emb["high_res_feats"]]
    if emb.get("fpn") is not None:
        fpn = emb["fpn"]
        out["fpn"] = [ie] if len(fpn) == 1 and fpn[0] is emb["image_embed"] else [t[i] for t in fpn]
    return out


def check_frozen(model) -> None:
    if any(p.requires_grad for p in model.sam.image_encoder.parameters()):
        raise InputError(f"an embedding cache needs a frozen image encoder, and model {getattr(model, 'name', '')!r} "
                         "trains its encoder: use a model trained with --peft decoder (or a frozen teacher), "
                         "or leave out --embed-cache")


def attach(model, folder, write: bool = True) -> EmbeddingCache:
    """Make ``model.encode`` read (and, with ``write``, fill) the cache in ``folder``."""
    check_frozen(model)
    if getattr(model, "_embed_cache", None) is not None:
        return model._embed_cache
    cache = EmbeddingCache(folder, encoder_fingerprint(model))
    plain = model.encode

    def encode(self, images: torch.Tensor) -> dict:
        keys = [input_key(x) for x in images]
        found = [cache.get(k) for k in keys]
        todo = [i for i, f in enumerate(found) if f is None]
        if todo:
            with torch.no_grad():
                fresh = plain(images[todo])
            for j, i in enumerate(todo):
                found[i] = _to_store(_rows(fresh, j))
                if write:
                    cache.put(keys[i], found[i])
        cache.hits += len(keys) - len(todo)
        cache.misses += len(todo)
        dtype = next(self.sam.parameters()).dtype
        return _stack(found, images.device, dtype)

    model.encode = types.MethodType(encode, model)
    model._embed_cache = cache
    return cache


# ------------------------------------------------------------------------------ filling
def _onnx_encoder(model, folder: Path):
    """An ONNX Runtime session for ``model``'s image embedding (exported once into the cache)."""
    import onnxruntime as ort

    class _Embed(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.encode(x)["image_embed"]

    path = folder / "encoder.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "encoder.onnx.tmp"
        S = model.image_size
        with torch.no_grad():
            torch.onnx.export(_Embed(model).eval(), torch.zeros(1, 3, S, S), str(tmp), opset_version=17,
                              input_names=["image"], output_names=["image_embed"], dynamo=False)
        tmp.replace(path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def fill(model, folder, images: Iterable[tuple[str, np.ndarray]], total: int | None = None,
         use_onnx: bool = True, progress: Callable[[int, int, str], None] | None = None,
         cancel: Callable[[], bool] | None = None) -> dict:
    """Compute the embedding of every image that has no entry yet.  ``images`` yields
    ``(name, image array)``; returns counts.  Only models whose decoder needs the image
    embedding alone (LiteMedSAM) can go through ONNX Runtime; others use PyTorch."""
    from uniultra.data.transforms import to_model_input

    check_frozen(model)
    model = model.eval()
    cache = EmbeddingCache(folder, encoder_fingerprint(model))
    session = None
    single = getattr(model.arch, "family", "sam2") != "sam2"
    if use_onnx and single:
        session = _onnx_encoder(model, cache.root)
    done = computed = 0
    for name, image in images:
        if cancel is not None and cancel():
            raise Cancelled("embedding cache stopped; run the same command again to continue")
        x, _ = to_model_input(image, model.image_size)
        key = input_key(x[0])
        if not cache.path(key).is_file():
            if session is not None:
                e = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
                row = {"image_embed": e[0], "fpn": None}
            else:
                with torch.no_grad():
                    row = _rows(model.encode(x), 0)
            cache.put(key, row)
            computed += 1
        done += 1
        if progress is not None:
            progress(done, total or done, f"embedding {name}")
    return {"images": done, "computed": computed, "folder": str(cache.root)}
