"""Text generation for M6Model: greedy, beam search and nucleus (top-p) sampling over a KV cache."""

from __future__ import annotations

import torch

from m6.config import BOS_ID, EOS_ID, MASK_ID, PAD_ID, SEP_ID
from m6.model.transformer import KVCache

_BANNED = (PAD_ID, BOS_ID, MASK_ID, SEP_ID)  # never generated; </s> ends a sequence


class Decoder:
    """Incremental decoding state: the prefix once, then one target token per step.

    With ``use_cache`` each step feeds only the new token and attends to the cached
    keys/values; without it every step re-runs the whole sequence through the
    prefix-LM mask (the reference the KV cache must match).
    """

    def __init__(self, model, image, src, start_id: int, batch: int, use_cache: bool):
        self.model, self.image, self.src, self.use_cache = model, image, src, use_cache
        device = next(model.parameters()).device
        self.tgt = torch.full((batch, 1), start_id, dtype=torch.int64, device=device)
        self.cache = KVCache(model.cfg.n_layers) if use_cache else None
        x, mask, _, self.key_valid = model._assemble(image, src, self.tgt)
        h, _ = model.encoder(x, mask, self.cache, token_valid=self.key_valid)
        self.last = h[:, -1]

    def logits(self) -> torch.Tensor:
        """Next-token logits ``[B, V]`` in fp32 with the never-generated specials removed."""
        logits = (self.last @ self.model.tok.weight.t()).float()
        logits[:, list(_BANNED)] = float("-inf")
        return logits

    def push(self, tokens_B: torch.Tensor) -> None:
        """Append one token per row and advance the model by one position."""
        m = self.model
        t = self.tgt.shape[1]
        self.tgt = torch.cat([self.tgt, tokens_B.view(-1, 1)], 1)
        if self.use_cache:
            from m6.model.m6 import SEG_TARGET

            x = m._text_embed(tokens_B.view(-1, 1), SEG_TARGET, offset=t)
            self.key_valid = torch.cat([self.key_valid, torch.ones_like(self.key_valid[:, :1])], 1)
            h, _ = m.encoder(x, self.key_valid.view(x.shape[0], 1, 1, -1), self.cache)
        else:
            x, mask, _, self.key_valid = m._assemble(self.image, self.src, self.tgt)
            h, _ = m.encoder(x, mask, None, token_valid=self.key_valid)
        self.last = h[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search)."""
        self.tgt = self.tgt.index_select(0, index)
        self.key_valid = self.key_valid.index_select(0, index)
        self.last = self.last.index_select(0, index)
        if self.image is not None:
            self.image = self.image.index_select(0, index)
        if self.src is not None:
            self.src = self.src.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)


def _prefix_ids(prefix, max_len: int, device) -> torch.Tensor:
    from m6.model.m6 import _pad

    rows = prefix.tolist() if isinstance(prefix, torch.Tensor) else [list(r) for r in prefix]
    # tolerate prefixes that carry their own specials (<s>, </s>, padding): the source is rebuilt here
    rows = [[BOS_ID] + [int(t) for t in r if int(t) not in (PAD_ID, BOS_ID, EOS_ID)][: max_len - 1] for r in rows]
    return _pad(rows, device)


@torch.no_grad()
def generate(model, *, image=None, prefix=None, max_new_tokens=None, method="greedy", num_beams=4, top_p=0.9,
             temperature=1.0, use_cache=True) -> list[list[int]]:
    """See :meth:`m6.model.m6.M6Model.generate`."""
    if method not in ("greedy", "beam", "top_p"):
        raise ValueError(f"method must be greedy|beam|top_p, got {method!r}")
    if image is None and prefix is None:
        raise ValueError("generate needs an image, a prefix, or both")
    if temperature <= 0 or not 0 < top_p <= 1 or num_beams < 1:
        raise ValueError("need temperature > 0, 0 < top_p <= 1 and num_beams >= 1")
    cfg = model.cfg
    device = next(model.parameters()).device
    if image is not None:
        image = model._check_image(image.to(device), "generate")
    src = _prefix_ids(prefix, cfg.max_text_len, device) if prefix is not None else None
    sizes = {t.shape[0] for t in (image, src) if t is not None}
    if len(sizes) != 1:
        raise ValueError(f"image and prefix batch sizes differ: {sorted(sizes)}")
    B = sizes.pop()
    limit = cfg.max_text_len - 1
    n_new = limit if max_new_tokens is None else max(0, min(int(max_new_tokens), limit))
    start = SEP_ID if prefix is not None else BOS_ID
    was_training = model.training
    model.eval()
    model.encoder.reset_stats()
    try:
        if n_new == 0:
            return [[] for _ in range(B)]
        if method == "beam":
            return _beam(model, image, src, start, B, n_new, num_beams, temperature, use_cache)
        return _sample(model, image, src, start, B, n_new, method, top_p, temperature, use_cache)
    finally:
        model.train(was_training)


def _sample(model, image, src, start, B, n_new, method, top_p, temperature, use_cache):
    dec = Decoder(model, image, src, start, B, use_cache)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dec.tgt.device)
    for step in range(n_new):
        logits = dec.logits()
        if method == "greedy":
            nxt = logits.argmax(-1)
        else:
            nxt = _nucleus(logits / temperature, top_p)
        nxt = torch.where(done, torch.full_like(nxt, EOS_ID), nxt)
        for i, t in enumerate(nxt.tolist()):
            if not done[i] and t != EOS_ID:
                out[i].append(t)
        done |= nxt == EOS_ID
        if bool(done.all()) or step == n_new - 1:
            break
        dec.push(nxt)
    return out


def _nucleus(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability mass reaches ``top_p`` (arXiv 1904.09751)."""
    probs = logits_BV.softmax(-1)
    p_sorted, idx = probs.sort(-1, descending=True)
    before = p_sorted.cumsum(-1) - p_sorted  # mass of the strictly more likely tokens
    p_sorted = p_sorted.masked_fill(before >= top_p, 0.0)
    choice = torch.multinomial(p_sorted / p_sorted.sum(-1, keepdim=True), 1)
    return idx.gather(-1, choice).squeeze(-1)


def _beam(model, image, src, start, B, n_new, nb, temperature, use_cache):
    """Beam search with length-normalised scores (sum of log-probs / length, </s> included)."""
    expand = lambda t: None if t is None else t.repeat_interleave(nb, 0)  # noqa: E731
    dec = Decoder(model, expand(image), expand(src), start, B * nb, use_cache)
    device = dec.tgt.device
    scores = torch.full((B, nb), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    hyps: list[list[list[int]]] = [[[] for _ in range(nb)] for _ in range(B)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    for step in range(n_new):
        logp = torch.log_softmax(dec.logits() / temperature, -1)
        V = logp.shape[-1]
        cand = (scores.unsqueeze(-1) + logp.view(B, nb, V)).view(B, nb * V)
        top_s, top_i = cand.topk(2 * nb, dim=-1)
        new_scores = torch.full((B, nb), float("-inf"), device=device)
        new_beam = torch.zeros((B, nb), dtype=torch.int64, device=device)
        new_tok = torch.full((B, nb), EOS_ID, dtype=torch.int64, device=device)
        new_hyps = []
        for b in range(B):
            row: list[list[int]] = []
            if len(finished[b]) < nb:
                for s, i in zip(top_s[b].tolist(), top_i[b].tolist()):
                    if s == float("-inf") or len(row) == nb:
                        break
                    beam, tok = divmod(i, V)
                    if tok == EOS_ID:
                        finished[b].append((s / (len(hyps[b][beam]) + 1), hyps[b][beam]))
                        continue
                    new_scores[b, len(row)], new_beam[b, len(row)], new_tok[b, len(row)] = s, beam, tok
                    row.append(hyps[b][beam] + [tok])
            new_hyps.append(row + [[] for _ in range(nb - len(row))])
        scores, hyps = new_scores, new_hyps
        if all(len(f) >= nb for f in finished) or step == n_new - 1:
            break
        dec.reorder((torch.arange(B, device=device).unsqueeze(1) * nb + new_beam).view(-1))
        dec.push(new_tok.view(-1))
    results = []
    for b in range(B):
        pool = list(finished[b])
        for j in range(nb):
            if scores[b, j] > float("-inf"):
                pool.append((float(scores[b, j]) / max(1, len(hyps[b][j])), hyps[b][j]))
        results.append(max(pool, key=lambda p: p[0])[1] if pool else [])
    return results
