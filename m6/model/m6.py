"""The M6 model: one transformer stream over [image patches; source text; target text] with a prefix-LM mask.

Follows M6 (arXiv 2103.00823, Sec. 3): image features become prefix tokens, text
is appended, attention is bidirectional over the prefix and causal over the
target. Objectives: text-to-text span denoising, image-to-text (captioning),
multimodality-to-text, and an added image-text contrastive head for search.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from m6.config import BOS_ID, EOS_ID, MASK_ID, PAD_ID, SEP_ID, ModelConfig
from m6.model.transformer import KVCache, Transformer

OBJECTIVES = ("text", "caption", "mm", "contrastive")
SEG_IMAGE, SEG_SOURCE, SEG_TARGET = 0, 1, 2


class PatchEncoder(nn.Module):
    """Trainable convolutional patch encoder: one ``D``-vector per patch plus one global token.

    M6 uses a pretrained ResNet per patch; weights cannot be fetched at run time, so
    this stem is trained from scratch. ``backbone`` replaces the stem with any local
    module mapping ``[B,3,S,S]`` to a ``[B,C,S/p,S/p]`` feature map (e.g. a pretrained
    ResNet trunk loaded from disk); a 1×1 conv then projects C to D.

    The extra first token is a projection of the feature map max-pooled over the
    image: from scratch, attention starts out uniform and averages a small object's
    patch away, while a max-pooled "is it present" feature is visible from step one
    (on the synthetic catalogue it made captions depend on the image within ~100
    steps, where patches alone had not after 300).
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None, backbone_channels: int | None = None):
        super().__init__()
        D, p = cfg.d_model, cfg.patch_size
        self.backbone = backbone
        if backbone is not None:
            if backbone_channels is None:
                raise ValueError("backbone_channels is required with a backbone")
            c = backbone_channels
            self.proj = nn.Conv2d(c, D, kernel_size=1)
        else:
            c = max(16, min(64, D // 2))
            stride = 2 if p % 2 == 0 else 1
            self.stem = nn.Sequential(
                nn.Conv2d(3, c, 3, stride=stride, padding=1), nn.GELU(),
                nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
            )
            self.proj = nn.Conv2d(c, D, kernel_size=p // stride, stride=p // stride)
        self.glob = nn.Linear(c, D)

    def forward(self, image_B3SS: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + P, D]``: the global token, then the patches in raster order."""
        feats = self.backbone(image_B3SS) if self.backbone is not None else self.stem(image_B3SS)
        patches = self.proj(feats).flatten(2).transpose(1, 2)
        return torch.cat([self.glob(feats.amax(dim=(2, 3))).unsqueeze(1), patches], 1)


class AttentionPool(nn.Module):
    """One learned query attending over a sequence (multihead attention pooling).

    Mean pooling over a single shared stream leaves every sample dominated by the
    same position/segment component, and the contrastive loss then collapses all
    embeddings together; a learned query can weight the informative positions.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.ln = nn.LayerNorm(d_model)

    def forward(self, h_BLD: torch.Tensor, valid_BL: torch.Tensor | None = None) -> torch.Tensor:
        q = self.query.expand(h_BLD.shape[0], -1, -1)
        pad = None if valid_BL is None else ~valid_BL
        out, _ = self.attn(q, h_BLD, h_BLD, key_padding_mask=pad, need_weights=False)
        return self.ln(out[:, 0])


class M6Model(nn.Module):
    """Unified multimodal MoE transformer; see the module docstring and ``forward``.

    Sequence layout: ``[image: 1 global + num_patches tokens][source text][target text]``,
    each part with its own learned positions and a segment embedding. Contrastive
    embeddings come from attention pooling over an image-only or text-only pass.

    Args:
        cfg: model shape.
        ep_group: process group for expert parallelism (each MoE layer then holds
            ``num_experts / group size`` experts); None keeps all experts local.
    """

    def __init__(self, cfg: ModelConfig, ep_group=None):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.patch = PatchEncoder(cfg)
        self.img_pos = nn.Parameter(torch.zeros(1, cfg.num_image_tokens, D))
        self.tok = nn.Embedding(cfg.vocab_size, D)
        self.txt_pos = nn.Embedding(cfg.max_text_len, D)
        self.seg = nn.Embedding(3, D)
        self.encoder = Transformer(cfg, ep_group)
        self.img_pool = AttentionPool(D, cfg.n_heads)
        self.img_skip = nn.LayerNorm(D)
        self.txt_pool = AttentionPool(D, cfg.n_heads)
        self.img_proj = nn.Linear(D, cfg.contrastive_dim, bias=False)
        self.txt_proj = nn.Linear(D, cfg.contrastive_dim, bias=False)
        # CLIP's learnable temperature, initialised to 1/0.07 (arXiv 2103.00020, Sec. 2.5).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for t in (self.img_pos, self.tok.weight, self.txt_pos.weight, self.seg.weight):
            nn.init.normal_(t, std=0.02)

    def load_backbone(self, backbone: "str | nn.Module") -> None:
        """Replace the trainable conv stem with a local pretrained image backbone (M6 uses a ResNet).

        Args:
            backbone: a TorchScript file path (``torch.jit.save``) or a module; it must map
                ``[B,3,S,S]`` to a ``[B,C,S/p,S/p]`` feature map. A fresh 1×1 projection
                maps C to d_model. Nothing is downloaded.

        Raises:
            ValueError: when the backbone's feature map does not line up with the patch grid.
        """
        if isinstance(backbone, str):
            from pathlib import Path

            if not Path(backbone).is_file():
                raise ValueError(f"backbone file {backbone} does not exist")
            backbone = torch.jit.load(backbone, map_location="cpu")
        S, p = self.cfg.image_size, self.cfg.patch_size
        with torch.no_grad():
            feats = backbone(torch.zeros(1, 3, S, S))
        if feats.dim() != 4 or tuple(feats.shape[2:]) != (S // p, S // p):
            raise ValueError(f"backbone maps [1,3,{S},{S}] to {list(feats.shape)}; need [1,C,{S // p},{S // p}] "
                             f"(one feature vector per {p}-px patch)")
        device = self.img_pos.device
        self.patch = PatchEncoder(self.cfg, backbone=backbone, backbone_channels=feats.shape[1]).to(device)

    # ------------------------------------------------------------------ inputs

    def _check_text(self, text: torch.Tensor) -> None:
        if text.dim() != 2 or text.dtype != torch.int64:
            raise ValueError(f"batch['text'] must be int64 [B, T], got {text.dtype} {list(text.shape)}")
        if text.shape[1] > self.cfg.max_text_len:
            raise ValueError(f"batch['text'] has T={text.shape[1]} > model.max_text_len={self.cfg.max_text_len}")
        empty = ((text != PAD_ID).sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"batch['text'] rows {empty[:10]} are all padding; every row needs at least <s>")

    def _check_image(self, image: torch.Tensor | None, objective: str) -> torch.Tensor:
        S = self.cfg.image_size
        if image is None:
            raise ValueError(f"objective {objective!r} needs batch['image'] ([B,3,{S},{S}])")
        if image.dim() != 4 or tuple(image.shape[1:]) != (3, S, S):
            raise ValueError(f"batch['image'] must be [B,3,{S},{S}], got {list(image.shape)}")
        bad = (~torch.isfinite(image).flatten(1).all(1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"batch['image'] rows {bad[:10]} contain NaN or infinite values")
        return image.float()

    def _text_embed(self, ids_BT: torch.Tensor, segment: int, offset: int = 0) -> torch.Tensor:
        pos = torch.arange(offset, offset + ids_BT.shape[1], device=ids_BT.device)
        return self.tok(ids_BT) + self.txt_pos(pos) + self.seg.weight[segment]

    def _image_embed(self, image: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        patches = self.patch(image) if patches is None else patches
        return patches + self.img_pos + self.seg.weight[SEG_IMAGE]

    def _assemble(self, image, src, tgt_in):
        """Embeddings, prefix-LM mask and prefix length for [image; src; tgt_in] (each part optional).

        Mask semantics (True = may attend): every query sees the valid prefix keys
        (image + non-pad source) bidirectionally; target queries also see target keys
        at or before their own position. Pad keys are never seen.
        """
        parts, valid = [], []
        if image is not None:
            e = self._image_embed(image)
            parts.append(e)
            valid.append(torch.ones(e.shape[:2], dtype=torch.bool, device=e.device))
        if src is not None:
            parts.append(self._text_embed(src, SEG_SOURCE))
            valid.append(src != PAD_ID)
        n_prefix = sum(p.shape[1] for p in parts)
        if tgt_in is not None:
            parts.append(self._text_embed(tgt_in, SEG_TARGET))
            valid.append(tgt_in != PAD_ID)
        x = torch.cat(parts, 1)
        key_valid = torch.cat(valid, 1)
        return x, prefix_lm_mask(key_valid, n_prefix), n_prefix, key_valid

    # ------------------------------------------------------------------ objectives

    def forward(self, batch: dict[str, torch.Tensor], objective: str) -> dict:
        """Loss of one objective on a batch.

        Args:
            batch: ``"text"`` int64 ``[B,T]`` (``<s> … </s>`` then pad) and, for every
                objective but ``"text"``, ``"image"`` float32 ``[B,3,S,S]`` in [-1, 1].
            objective: ``"text"`` | ``"caption"`` | ``"mm"`` | ``"contrastive"``.

        Returns:
            ``loss`` (objective + MoE aux, what to backpropagate), ``obj_loss``,
            ``aux_loss``, ``tokens`` (target tokens; for contrastive, non-pad text
            tokens embedded).
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if "text" not in batch:
            raise ValueError("batch has no 'text' key")
        text = batch["text"]
        self._check_text(text)
        self.encoder.reset_stats()
        if objective == "contrastive":
            image = self._check_image(batch.get("image"), objective)
            img, aux_i = self._embed_image(image)
            txt, aux_t = self._embed_text(text)
            obj = contrastive_loss(img, txt, self.logit_scale)
            aux = aux_i + aux_t
            tokens = int((text != PAD_ID).sum())
        else:
            image = None if objective == "text" else self._check_image(batch.get("image"), objective)
            if objective == "text":
                src, tgt_in, labels = span_corrupt(text), text[:, :-1], text[:, 1:]
            elif objective == "caption":
                src, tgt_in, labels = None, text[:, :-1], text[:, 1:]
            else:
                src, tgt_in, labels = split_prefix(text)
            x, mask, n_prefix, valid = self._assemble(image, src, tgt_in)
            h, aux = self.encoder(x, mask, token_valid=valid)
            logits = h[:, n_prefix:] @ self.tok.weight.t()
            obj = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=PAD_ID)
            tokens = int((labels != PAD_ID).sum())
        return {"loss": obj + aux, "obj_loss": obj, "aux_loss": aux, "tokens": tokens}

    def _embed_image(self, image):
        patches = self.patch(image)
        h, aux = self.encoder(self._image_embed(image, patches), None)
        # A skip from the patch encoder's max-pooled features straight into the embedding: through
        # the shared stream alone the contrastive loss sat at ln(batch) for hundreds of steps at
        # lr >= 1e-3 on the synthetic catalogue; with it, it learns from the first steps.
        pooled = self.img_pool(h) + self.img_skip(patches.amax(1))
        return F.normalize(self.img_proj(pooled), dim=-1), aux

    def _embed_text(self, text):
        valid = text != PAD_ID
        x = self._text_embed(text, SEG_SOURCE)
        h, aux = self.encoder(x, prefix_lm_mask(valid, text.shape[1]), token_valid=valid)
        return F.normalize(self.txt_proj(self.txt_pool(h, valid)), dim=-1), aux

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, contrastive_dim]`` in the contrastive space."""
        self.encoder.reset_stats()
        return self._embed_image(self._check_image(image, "embed_image"))[0]

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, contrastive_dim]`` for ``<s> … </s>``-padded ids."""
        self._check_text(text)
        self.encoder.reset_stats()
        return self._embed_text(text)[0]

    # ------------------------------------------------------------------ generation, MoE, sharing

    def generate(self, image: torch.Tensor | None = None, prefix=None, max_new_tokens: int | None = None,
                 method: str = "greedy", num_beams: int = 4, top_p: float = 0.9, temperature: float = 1.0,
                 use_cache: bool = True) -> list[list[int]]:
        """Generate text for an image (captioning) and/or a text prefix (continuation).

        Args:
            image: float32 ``[B,3,S,S]`` or None.
            prefix: token ids without specials, as ``list[list[int]]`` or an int64
                ``[B, Tp]`` tensor padded with 0; None for plain captioning.
            max_new_tokens: default and upper bound ``max_text_len - 1``.
            method: ``"greedy"``, ``"beam"`` or ``"top_p"`` (nucleus sampling, torch's global RNG).
            use_cache: decode incrementally with the KV cache (False recomputes the
                whole sequence each step; same result, slower).

        Returns:
            generated ids per example, specials removed, stopped at ``</s>``.
        """
        from m6.model.generate import generate

        return generate(self, image=image, prefix=prefix, max_new_tokens=max_new_tokens, method=method,
                        num_beams=num_beams, top_p=top_p, temperature=temperature, use_cache=use_cache)

    def moe_stats(self) -> list[dict]:
        """Per MoE layer (depth order): tokens_per_expert, dropped, load_cv, router_entropy from the last forward."""
        return self.encoder.moe_stats()

    def delink(self) -> dict[str, list[str]]:
        """Pseudo-to-Real (M6-10T, arXiv 2110.03888): give each layer its own copy of the shared weights.

        Outputs are identical right after the call. Returns shared parameter name →
        the per-layer names it became (for carrying optimizer state); ``{}`` when
        the model was not shared. ``self.cfg.share_layers`` becomes False.
        """
        mapping = self.encoder.delink(prefix="encoder.")
        self.cfg = dataclasses.replace(self.cfg, share_layers=False)
        self.encoder.cfg = self.cfg
        return mapping


# ---------------------------------------------------------------------- helpers


def prefix_lm_mask(key_valid_BL: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Boolean ``[B,1,L,L]`` mask: bidirectional over the first ``n_prefix`` positions, causal after, no pad keys."""
    L = key_valid_BL.shape[1]
    idx = torch.arange(L, device=key_valid_BL.device)
    q, k = idx.view(L, 1), idx.view(1, L)
    structure = (k < n_prefix) | ((q >= n_prefix) & (k <= q))
    return structure.view(1, 1, L, L) & key_valid_BL.view(-1, 1, 1, L)


def contrastive_loss(img_BC: torch.Tensor, txt_BC: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch pairs; the scale is capped at 100 as in CLIP."""
    logits = logit_scale.exp().clamp(max=100.0) * img_BC @ txt_BC.t()
    target = torch.arange(img_BC.shape[0], device=img_BC.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def _lengths(text: torch.Tensor) -> list[int]:
    return (text != PAD_ID).sum(1).tolist()


def _pad(rows: list[list[int]], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), PAD_ID, dtype=torch.int64, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.int64, device=device)
    return out


def span_corrupt(text: torch.Tensor, noise: float = 0.15, mean_span: float = 3.0) -> torch.Tensor:
    """Source side of text denoising: ~``noise`` of the inner tokens in spans, each span → one ``<mask>``.

    BART-style text infilling (arXiv 1910.13461), which M6's text-to-text objective
    follows: the target is the whole original text. ``<s>``/``</s>`` are never masked.
    Uses torch's global RNG.
    """
    rows = []
    for row, n in zip(text.tolist(), _lengths(text)):
        toks = row[:n]
        inner = n - 2
        if inner <= 0:
            rows.append(toks)
            continue
        n_mask = max(1, round(noise * inner))
        n_spans = max(1, round(n_mask / mean_span))
        starts = (torch.randperm(inner)[:n_spans] + 1).tolist()
        span = max(1, math.ceil(n_mask / n_spans))
        masked = [False] * n
        for s in starts:
            for j in range(s, min(s + span, n - 1)):
                masked[j] = True
        out = []
        for j, t in enumerate(toks):
            if not masked[j]:
                out.append(t)
            elif not masked[j - 1]:
                out.append(MASK_ID)
        rows.append(out)
    return _pad(rows, text.device)


def split_prefix(text: torch.Tensor):
    """Multimodality-to-text split: source ``<s> a b``, target input ``<sep> c d``, labels ``c d </s>``.

    The split point is drawn per example with torch's global RNG, leaving at least
    one source token after ``<s>`` and one target token before ``</s>`` when the
    text is long enough.
    """
    srcs, tins, labels = [], [], []
    for row, n in zip(text.tolist(), _lengths(text)):
        toks = row[:n]
        if n < 3:  # degenerate "<s> </s>": nothing to split, predict </s> from <s>
            srcs.append(toks[:1]), tins.append([SEP_ID]), labels.append(toks[1:] or [EOS_ID])
            continue
        hi = max(2, n - 2)
        s = int(torch.randint(2, hi + 1, (1,)))
        srcs.append(toks[:s])
        tins.append([SEP_ID] + toks[s:n - 1])
        labels.append(toks[s:n])
    return _pad(srcs, text.device), _pad(tins, text.device), _pad(labels, text.device)


__all__ = ["M6Model", "OBJECTIVES", "prefix_lm_mask", "span_corrupt", "split_prefix", "contrastive_loss",
           "BOS_ID", "EOS_ID"]
