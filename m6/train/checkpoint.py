"""Checkpoints: per-rank state, a consolidated model, COMPLETE written last, retention, resume, load_model."""

from __future__ import annotations

import io
import json
import logging
import random
import re
from typing import Any

import torch

from m6 import storage
from m6.errors import UserError

log = logging.getLogger(__name__)
SCHEMA = "m6.checkpoint/v1"
_STEP_DIR = re.compile(r"step-(\d{8})$")


def step_dir(root: str, step: int) -> str:
    return storage.join(root, f"step-{step:08d}")


def list_checkpoints(root: str) -> list[tuple[int, str, bool]]:
    """``(step, uri, complete)`` of every checkpoint folder below ``root``, oldest first."""
    found: dict[int, tuple[str, bool]] = {}
    for uri in storage.list_uris(root):
        rel = uri[len(str(root).rstrip("/")) + 1:]
        head = rel.split("/", 1)[0]
        m = _STEP_DIR.match(head)
        if not m:
            continue
        step = int(m.group(1))
        d = storage.join(root, head)
        _, complete = found.get(step, (d, False))
        found[step] = (d, complete or rel == f"{head}/COMPLETE")
    return [(s, d, c) for s, (d, c) in sorted(found.items())]


def latest_complete(root: str) -> str | None:
    """The newest checkpoint folder that has its COMPLETE marker; partial ones are never chosen."""
    done = [d for _, d, c in list_checkpoints(root) if c]
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    import numpy as np

    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def consolidated_state(model: torch.nn.Module, ep_group: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole model's weights (every expert, full tensors). Collective: every rank must call it.

    Expert tensors hold this rank's ``E / ep`` experts along dim 0, so they are all-gathered
    over the expert-parallel group (ranks in EP-rank order) into the ``E``-expert layout a
    single-process ``M6Model`` loads. Under ZeRO-3 partitioned parameters are gathered first.
    """
    import torch.distributed as dist

    names = {id(p): n for n, p in model.named_parameters()}
    params = list(model.parameters())
    if zero_stage == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    out: dict[str, torch.Tensor] = {}
    with ctx:
        for p in params:
            t = p.detach()
            if getattr(p, "allreduce", True) is False and ep_group is not None and dist.get_world_size(ep_group) > 1:
                parts = [torch.empty_like(t) for _ in range(dist.get_world_size(ep_group))]
                dist.all_gather(parts, t.contiguous(), group=ep_group)
                t = torch.cat(parts, 0)
            from m6.train.engine import SCALAR_PARAMS

            name = names[id(p)]
            if name in SCALAR_PARAMS:
                t = t.reshape(())
            out[name] = t.to("cpu", torch.float32).contiguous().clone()
    return out


def save(ckpt: str, *, rank: int, rank_state: dict[str, Any], model_state: dict[str, torch.Tensor] | None,
         meta: dict[str, Any], tokenizer_json: str | None) -> None:
    """Write this rank's files; rank 0 also writes ``model.safetensors``, ``m6.json`` and the tokenizer.

    The caller runs a barrier afterwards and then :func:`publish` on rank 0, so COMPLETE
    exists only once every rank's files are fully written.
    """
    storage.write_bytes(storage.join(ckpt, f"rank-{rank:05d}.pt"), _to_bytes(rank_state))
    if rank == 0:
        from safetensors.torch import save as st_save

        assert model_state is not None
        storage.write_bytes(storage.join(ckpt, "model.safetensors"), st_save(model_state, metadata={"schema": SCHEMA}))
        if tokenizer_json is not None:
            storage.write_text(storage.join(ckpt, "tokenizer.json"), tokenizer_json)
        storage.write_json(storage.join(ckpt, "m6.json"), {"schema": SCHEMA, **meta})


def publish(ckpt: str, root: str, keep_last: int, step: int) -> None:
    """Rank 0, after the barrier: write COMPLETE, then drop old and abandoned partial checkpoints."""
    storage.publish(ckpt, content={"step": step})
    ckpts = list_checkpoints(root)
    complete = [d for _, d, c in ckpts if c]
    for d in complete[:-keep_last]:
        storage.delete_tree(d)
    for s, d, c in ckpts:
        if not c and s < step:  # a write that died before its COMPLETE; never loadable
            storage.delete_tree(d)


def load_rank_state(ckpt: str, rank: int) -> dict[str, Any]:
    uri = storage.join(ckpt, f"rank-{rank:05d}.pt")
    if not storage.exists(uri):
        meta = storage.read_json(storage.join(ckpt, "m6.json"))
        raise UserError(f"{ckpt}: no state for rank {rank}; it was written by {meta.get('world_size')} processes, "
                        f"resume with the same --nproc")
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=False)


def resolve(uri: str) -> str:
    """A run's out dir, its checkpoints root, or one checkpoint dir → the checkpoint dir to load."""
    if storage.is_complete(uri):
        return uri
    for root in (storage.join(uri, "checkpoints"), uri):
        found = latest_complete(root)
        if found:
            return found
    if storage.exists(storage.join(uri, "m6.json")):
        raise UserError(f"{uri}: checkpoint has no COMPLETE marker (its write did not finish); refusing to load it")
    raise UserError(f"{uri}: no complete checkpoint found (looked for checkpoints/step-*/COMPLETE)")


def load_model(uri: str) -> tuple[Any, Any, Any, dict]:
    """Load a trained model for evaluation or export.

    Args:
        uri: a run's out dir, its ``checkpoints`` root, or one checkpoint dir (local or s3://);
            the newest complete checkpoint is taken.

    Returns:
        ``(M6Model in eval mode on the CPU, Config, tokenizers.Tokenizer, meta)``; meta is the
        checkpoint's ``m6.json`` plus ``checkpoint`` (its URI).
    """
    from safetensors.torch import load as st_load

    from m6.config import Config, from_dict
    from m6.data.tokenizer import load_tokenizer
    from m6.model.m6 import M6Model

    ckpt = resolve(uri)
    meta = storage.read_json(storage.join(ckpt, "m6.json"))
    cfg = from_dict(Config, {k: v for k, v in meta["config"].items() if k != "preset"})
    cfg.preset = meta["config"].get("preset", "custom")
    model = M6Model(cfg.model)
    state = st_load(storage.read_bytes(storage.join(ckpt, "model.safetensors")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{ckpt}: weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    tok_uri = storage.join(ckpt, "tokenizer.json")
    if not storage.exists(tok_uri):
        tok_uri = storage.join(ckpt.rsplit("/checkpoints/", 1)[0], "tokenizer.json")
    tokenizer = load_tokenizer(tok_uri)
    return model, cfg, tokenizer, {**meta, "checkpoint": ckpt}


def read_meta(ckpt: str) -> dict[str, Any]:
    """A checkpoint's ``m6.json`` (config, step, tokens seen, data position, seeds)."""
    return json.loads(storage.read_text(storage.join(ckpt, "m6.json")))
