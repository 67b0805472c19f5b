"""Duplicate detection: exact (pixel / normalized-text hashes), near-duplicate images (pHash) and texts (MinHash LSH)."""

from __future__ import annotations

from m6.config import DataConfig
from m6.data.filters import PHASH_BITS, normalize_for_hash


def color_distance(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two colour signatures, in 0..255 levels."""
    return sum(abs(x - y) for x, y in zip(a, b)) / max(1, len(a))


class PHashIndex:
    """Finds a stored ``nbits``-bit hash within ``max_bits`` Hamming distance of a query, exactly.

    Pigeonhole: split the bits into ``max_bits + 1`` bands; two hashes that differ in
    at most ``max_bits`` bits agree on at least one whole band, so only hashes sharing a
    band value are compared. Memory is a few ints per stored image.
    """

    def __init__(self, max_bits: int, color_tol: float = 255.0, nbits: int = PHASH_BITS) -> None:
        self.max_bits = max_bits
        self.color_tol = color_tol
        nb = max_bits + 1
        edges = [round(i * nbits / nb) for i in range(nb + 1)]
        self._bands = [(edges[i], edges[i + 1] - edges[i]) for i in range(nb)]
        self._tables: list[dict[int, list[tuple[int, bytes]]]] = [{} for _ in range(nb)]

    def _keys(self, h: int) -> list[int]:
        return [(h >> shift) & ((1 << width) - 1) for shift, width in self._bands]

    def query(self, h: int, sig: bytes = b"") -> int | None:
        """A stored hash within the threshold whose colour signature is within ``color_tol``, or None."""
        for table, k in zip(self._tables, self._keys(h)):
            for other, osig in table.get(k, ()):
                if (other ^ h).bit_count() <= self.max_bits and color_distance(sig, osig) <= self.color_tol:
                    return other
        return None

    def add(self, h: int, sig: bytes = b"") -> None:
        """Store a hash and its colour signature."""
        for table, k in zip(self._tables, self._keys(h)):
            table.setdefault(k, []).append((h, sig))


LSH_MARGIN = 0.15
"""LSH candidate threshold = minhash_threshold − this; candidates are verified exactly."""
MINHASH_SCHEME = "affine32"
"""datasketch's hashing scheme; signatures are only comparable within one scheme."""


def shingles(text: str, n: int = 3) -> set[str]:
    """Character n-grams of the normalized text (works for Chinese, which has no word spaces)."""
    t = normalize_for_hash(text)
    if len(t) <= n:
        return {t} if t else set()
    return {t[i:i + n] for i in range(len(t) - n + 1)}


def minhash_values(text: str, num_perm: int, seed: int = 1) -> list[int]:
    """MinHash signature of the text's character 3-grams (``datasketch``), as plain ints for pickling."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME)
    m.update_batch([s.encode("utf-8") for s in shingles(text)])
    return [int(v) for v in m.hashvalues]


class Deduplicator:
    """Global duplicate decisions, fed samples in a fixed order (the first of a group is kept)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self._pixels: set[bytes] = set()
        self._texts: set[bytes] = set()
        self._phash = PHashIndex(cfg.phash_hamming, cfg.near_dup_color_tol)
        self._lsh = None
        self._sigs: list = []
        """Kept texts' signatures (uint32, 4 bytes per permutation) to verify LSH candidates."""
        if cfg.near_dup_texts:
            from datasketch import MinHashLSH

            # Banding retrieves candidates at a lower threshold than the decision; each candidate is then
            # checked against the estimated Jaccard itself, so pairs just above the threshold are not missed.
            self._lsh = MinHashLSH(threshold=max(0.5, cfg.minhash_threshold - LSH_MARGIN), num_perm=cfg.minhash_perm)

    def check_image(self, pixel_hash: str, phash: int, color_sig: bytes = b"") -> str | None:
        """Reason code when the image duplicates a kept one, else record it and return None."""
        key = bytes.fromhex(pixel_hash)
        if self.cfg.dedup_exact and key in self._pixels:
            return "dup_image_exact"
        if self.cfg.near_dup_images and self._phash.query(phash, color_sig) is not None:
            return "dup_image_near"
        self._pixels.add(key)
        if self.cfg.near_dup_images:
            self._phash.add(phash, color_sig)
        return None

    def check_text(self, text_hash: str, minhash: list[int] | None) -> str | None:
        """Reason code when a text-only sample duplicates a kept one, else record it and return None."""
        key = bytes.fromhex(text_hash)
        if self.cfg.dedup_exact and key in self._texts:
            return "dup_text_exact"
        if self._lsh is not None and minhash is not None:
            import numpy as np
            from datasketch import MinHash

            sig = np.asarray(minhash, dtype=np.uint64)
            m = MinHash(num_perm=self.cfg.minhash_perm, hashvalues=sig, scheme=MINHASH_SCHEME)
            for cand in self._lsh.query(m):
                if float(np.mean(self._sigs[cand] == sig)) >= self.cfg.minhash_threshold:
                    return "dup_text_near"
            self._lsh.insert(len(self._sigs), m, check_duplication=False)
            self._sigs.append(sig.astype(np.uint32))
        self._texts.add(key)
        return None
