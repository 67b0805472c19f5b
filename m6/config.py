"""Dataclass configs for every stage, validated on construction, plus named presets.

Configs are nested keyword-only dataclasses, one per concern. They load from
JSON/YAML files or dicts through :func:`from_dict`, which rejects unknown keys
and wrong types with a message naming the exact field (``train.lr: expected
float, got str 'fast'``).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<mask>", "<sep>")
"""Tokenizer specials, always ids 0..4: pad, bos, eos, mask (span denoising), sep (source|target)."""
PAD_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID = range(len(SPECIAL_TOKENS))


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the field."""


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


# --------------------------------------------------------------------------- model


@dataclass(kw_only=True)
class MoEConfig:
    """One Mixture-of-Experts FFN layer (M6-T, arXiv 2105.15082)."""

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 1
    """Experts per token when ``num_prototypes == 1`` (plain top-k routing)."""
    num_prototypes: int = 1
    """k top-1 expert prototyping: experts split into this many groups, top-1 in each."""
    capacity_factor: float | None = None
    """None = dropless; otherwise tokens beyond capacity are dropped (and counted)."""
    aux_loss_coef: float = 0.01
    """Switch load-balancing loss weight α (0 disables it)."""
    z_loss_coef: float = 0.001
    """Router z-loss weight (ST-MoE; 0 disables it)."""

    def __post_init__(self) -> None:
        w = "moe"
        _check(self.d_model > 0 and self.d_ff > 0, w, "d_model and d_ff must be positive")
        _check(self.num_experts >= 1, w, f"num_experts must be >= 1, got {self.num_experts}")
        _check(self.num_prototypes >= 1, w, "num_prototypes must be >= 1")
        _check(
            self.num_experts % self.num_prototypes == 0,
            w,
            f"num_experts ({self.num_experts}) must divide into num_prototypes ({self.num_prototypes}) groups",
        )
        if self.num_prototypes > 1:
            _check(self.top_k == 1, w, "with num_prototypes > 1 routing is top-1 per prototype; set top_k=1")
        _check(1 <= self.top_k <= self.num_experts, w, f"top_k must be in [1, num_experts], got {self.top_k}")
        _check(
            self.capacity_factor is None or self.capacity_factor > 0,
            w,
            "capacity_factor must be positive or None (dropless)",
        )
        _check(self.aux_loss_coef >= 0 and self.z_loss_coef >= 0, w, "loss coefficients must be >= 0")

    @property
    def experts_per_token(self) -> int:
        return self.top_k * self.num_prototypes


@dataclass(kw_only=True)
class ModelConfig:
    """The unified single-stream M6 transformer (arXiv 2103.00823)."""

    name: str = "custom"
    vocab_size: int = 4096
    """Text vocabulary; the trainer overrides it with the curated tokenizer's size."""
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    """Dense FFN width (layers without MoE)."""
    moe_every: int = 2
    """Every n-th layer (1-based: layers n, 2n, …) has an MoE FFN; 0 = no MoE."""
    num_experts: int = 4
    expert_d_ff: int = 256
    top_k: int = 1
    num_prototypes: int = 1
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    share_layers: bool = False
    """Cross-layer parameter sharing (the 'pseudo' giant of M6-10T Pseudo-to-Real)."""
    image_size: int = 32
    """Input image side in pixels (square after center crop)."""
    patch_size: int = 8
    max_text_len: int = 32
    dropout: float = 0.0
    contrastive_dim: int = 64
    vq_codebook_size: int = 256
    """Image-token codebook for text-to-image (VQ tokenizer)."""

    def __post_init__(self) -> None:
        w = "model"
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "num_experts", "expert_d_ff",
                  "image_size", "patch_size", "max_text_len", "contrastive_dim"):
            _check(getattr(self, f) > 0, f"{w}.{f}", f"must be positive, got {getattr(self, f)}")
        _check(self.d_model % self.n_heads == 0, w, f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        _check(self.image_size % self.patch_size == 0, w, "image_size must be a multiple of patch_size")
        _check(self.moe_every >= 0, f"{w}.moe_every", "must be >= 0")
        _check(0.0 <= self.dropout < 1.0, f"{w}.dropout", "must be in [0, 1)")
        self.moe()  # validates the MoE fields

    def moe(self) -> MoEConfig:
        return MoEConfig(
            d_model=self.d_model, d_ff=self.expert_d_ff, num_experts=self.num_experts, top_k=self.top_k,
            num_prototypes=self.num_prototypes, capacity_factor=self.capacity_factor,
            aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef,
        )

    def is_moe_layer(self, i: int) -> bool:
        """Layer ``i`` (0-based) has an MoE FFN."""
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Positions an image takes in the sequence: one global token plus the patches."""
        return self.num_patches + 1


# --------------------------------------------------------------------------- data


@dataclass(kw_only=True)
class DataConfig:
    """Curation: filters, shard sizes, split and tokenizer (``m6 curate``)."""

    image_size: int = 64
    """Shorter side after resizing, in pixels."""
    image_format: str = "jpg"
    jpeg_quality: int = 90
    min_side: int = 16
    """Minimum shorter side of the decoded image, in pixels."""
    min_pixels: int = 256
    max_aspect_ratio: float = 4.0
    min_caption_chars: int = 2
    """Caption length bounds in characters (a CJK character counts as one)."""
    max_caption_chars: int = 256
    min_text_chars: int = 8
    """Length bounds of text-only documents, in characters."""
    max_text_chars: int = 4096
    min_cjk_ratio: float = 0.3
    """For captions tagged ``zh``: minimum share of CJK characters among non-space characters."""
    blocklist: list[str] = field(default_factory=lambda: ["lorem ipsum", "click here", "buy now!!!", "免费领取"])
    dedup_exact: bool = True
    near_dup_images: bool = True
    phash_hamming: int = 8
    """Images whose 256-bit perceptual hashes (16×16 DCT) differ in at most this many bits are near-duplicates."""
    near_dup_color_tol: float = 12.0
    """…and whose 4×4 colour thumbnails differ by at most this mean absolute level (0-255); pHash is luminance-only."""
    near_dup_texts: bool = True
    minhash_threshold: float = 0.9
    """Estimated Jaccard similarity (character 3-grams) above which text-only samples are near-duplicates."""
    minhash_perm: int = 64
    shard_max_samples: int = 1000
    shard_max_bytes: int = 64 * 1024 * 1024
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    workers: int = 1
    tokenizer_vocab_size: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        w = "data"
        _check(self.image_format in ("jpg", "png"), f"{w}.image_format", f"must be 'jpg' or 'png', got {self.image_format!r}")
        _check(8 <= self.image_size <= 4096, f"{w}.image_size", f"must be in [8, 4096], got {self.image_size}")
        _check(1 <= self.jpeg_quality <= 100, f"{w}.jpeg_quality", "must be in [1, 100]")
        _check(self.max_aspect_ratio >= 1.0, f"{w}.max_aspect_ratio", "must be >= 1")
        _check(0 <= self.min_caption_chars <= self.max_caption_chars, f"{w}.min_caption_chars", "must be <= max_caption_chars")
        _check(0 <= self.min_text_chars <= self.max_text_chars, f"{w}.min_text_chars", "must be <= max_text_chars")
        _check(0.0 <= self.min_cjk_ratio <= 1.0, f"{w}.min_cjk_ratio", "must be in [0, 1]")
        _check(0 <= self.phash_hamming <= 64, f"{w}.phash_hamming", "must be in [0, 64] (of 256 bits)")
        _check(0.0 < self.minhash_threshold <= 1.0, f"{w}.minhash_threshold", "must be in (0, 1]")
        _check(self.shard_max_samples >= 1 and self.shard_max_bytes >= 1024, f"{w}.shard_max_samples", "shard limits too small")
        _check(0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1,
               f"{w}.val_fraction", "val + test fractions must be in [0, 1)")
        _check(self.workers >= 1, f"{w}.workers", "must be >= 1")
        _check(self.tokenizer_vocab_size >= 300, f"{w}.tokenizer_vocab_size", "must be >= 300 (256 bytes + specials)")


# --------------------------------------------------------------------------- training


@dataclass(kw_only=True)
class TrainConfig:
    """Pretraining with DeepSpeed (``m6 train``)."""

    steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    zero_stage: int = 0
    offload: str = "none"
    """'none', 'optimizer', or 'granular:FRACTION' / 'granular:0,1,5' (layers whose state lives on the CPU)."""
    ep_size: int = 1
    activation_checkpointing: bool = False
    precision: str = "auto"
    """'auto' (bf16 on GPUs, fp32 on the CPU), 'fp32' or 'bf16'."""
    objective_weights: dict[str, float] = field(
        default_factory=lambda: {"text": 1.0, "caption": 1.0, "mm": 1.0, "contrastive": 1.0}
    )
    save_every: int = 50
    keep_last: int = 3
    log_every: int = 10
    shuffle_buffer: int = 256
    p2r_delink_step: int | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        w = "train"
        _check(self.steps >= 1, f"{w}.steps", "must be >= 1")
        _check(self.micro_batch_size >= 1 and self.grad_accum >= 1, f"{w}.micro_batch_size", "batch sizes must be >= 1")
        _check(self.lr > 0, f"{w}.lr", "must be positive")
        _check(self.zero_stage in (0, 1, 2, 3), f"{w}.zero_stage", f"must be 0-3, got {self.zero_stage}")
        _check(self.offload == "none" or self.offload == "optimizer" or self.offload.startswith("granular:"),
               f"{w}.offload", f"must be none|optimizer|granular:FRACTION, got {self.offload!r}")
        _check(self.ep_size >= 1, f"{w}.ep_size", "must be >= 1")
        _check(self.precision in ("auto", "fp32", "bf16"), f"{w}.precision", "must be auto|fp32|bf16")
        _check(all(v >= 0 for v in self.objective_weights.values()) and sum(self.objective_weights.values()) > 0,
               f"{w}.objective_weights", "weights must be >= 0 with a positive sum")
        unknown = set(self.objective_weights) - {"text", "caption", "mm", "contrastive"}
        _check(not unknown, f"{w}.objective_weights", f"unknown objectives {sorted(unknown)}")
        _check(self.save_every >= 1 and self.keep_last >= 1 and self.log_every >= 1, w, "save_every/keep_last/log_every must be >= 1")


# --------------------------------------------------------------------------- energy


@dataclass(kw_only=True)
class EnergyConfig:
    """Energy and carbon accounting."""

    enabled: bool = True
    sample_hz: float = 10.0
    """Background power-sampling rate for sensors without an energy counter."""
    cpu_tdp_w: float | None = None
    """Assumed CPU package power per socket when no sensor exists; None = looked up or default."""
    pue: float = 1.1
    """Facility power usage effectiveness (facility energy = IT energy × PUE)."""
    grid_region: str = "world"
    grid_gco2_per_kwh: float | None = None
    """Override of the grid carbon intensity in gCO2e/kWh."""
    pushgateway: str | None = None
    prometheus_cross_check: str | None = None
    """Prometheus base URL to query DCGM/Kepler figures for a cross-check."""
    rapl_root: str = "/sys/class/powercap"
    """Where the powercap (RAPL) tree is mounted; containers may bind it elsewhere."""
    gpu_power_cross_check: bool = True
    """Also integrate NVML power beside the energy counter and report the difference (never added to totals)."""

    def __post_init__(self) -> None:
        _check(0 < self.sample_hz <= 1000, "energy.sample_hz", "must be in (0, 1000]")
        _check(self.pue >= 1.0, "energy.pue", f"must be >= 1.0, got {self.pue}")
        _check(self.cpu_tdp_w is None or self.cpu_tdp_w > 0, "energy.cpu_tdp_w", "must be positive")


# --------------------------------------------------------------------------- evaluation


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation and the deployment gate (``m6 eval``)."""

    split: str = "test"
    """Held-out split to evaluate: 'test', 'val', or 'all' (a dataset the model never trained on)."""
    batch_size: int = 32
    max_samples: int | None = 512
    """Cap on evaluated samples of the split, taken in manifest order; None = the whole split."""
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    ties: str = "expected"
    """Tied similarity scores: 'expected' (exact expectation over random tie breaks), 'pessimistic', 'optimistic'."""
    caption_method: str = "greedy"
    caption_max_tokens: int = 24
    num_examples: int = 6
    """Example predictions (with thumbnails) shown in the report."""
    seed: int = 0
    """Seeds the model's own randomness (span corruption) so perplexity is reproducible."""
    primary_metric: str = "retrieval.mean_recall"
    """The metric a candidate must improve over the champion to be promoted."""
    min_improvement: float = 0.0
    """Absolute margin by which the primary metric must beat the champion's (strictly)."""
    thresholds: dict[str, float] = field(default_factory=lambda: {"retrieval.mean_recall_lift": 1.2})
    """Metric → bound every promoted model must clear: a minimum, or a maximum for lower-is-better metrics."""
    guarded: dict[str, float] = field(default_factory=lambda: {
        "retrieval.mean_recall": 0.02, "captioning.cider_d": 0.05, "lm.text.perplexity": 0.05})
    """Metric → tolerated regression against the champion, as a fraction of the champion's value."""
    lower_is_better: list[str] = field(default_factory=lambda: ["perplexity", "load_cv", "drop_rate"])
    """Metric-name suffixes for which lower values are better."""

    def __post_init__(self) -> None:
        w = "eval"
        _check(self.split in ("test", "val", "all"), f"{w}.split",
               f"must be test|val|all (never the training split), got {self.split!r}")
        _check(self.batch_size >= 1, f"{w}.batch_size", "must be >= 1")
        _check(self.max_samples is None or self.max_samples >= 1, f"{w}.max_samples", "must be >= 1 or null")
        _check(bool(self.recall_ks) and all(k >= 1 for k in self.recall_ks), f"{w}.recall_ks", "must be positive cut-offs")
        _check(self.ties in ("expected", "pessimistic", "optimistic"), f"{w}.ties", "must be expected|pessimistic|optimistic")
        _check(self.caption_method in ("greedy", "beam", "top_p"), f"{w}.caption_method", "must be greedy|beam|top_p")
        _check(self.caption_max_tokens >= 1 and self.num_examples >= 0, w, "caption_max_tokens >= 1, num_examples >= 0")
        _check(self.min_improvement >= 0, f"{w}.min_improvement", "must be >= 0")
        bad = sorted(k for k, v in self.guarded.items() if v < 0)
        _check(not bad, f"{w}.guarded", f"tolerances must be >= 0 (see {bad})")


# --------------------------------------------------------------------------- whole


@dataclass(kw_only=True)
class Config:
    """Everything one run needs."""

    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- presets
# Each preset is a plain function; larger ones derive from smaller ones.


def _tiny() -> Config:
    return Config(
        preset="tiny",
        model=ModelConfig(name="tiny", vocab_size=1024, d_model=64, n_layers=2, n_heads=4, d_ff=128, moe_every=2,
                          num_experts=4, expert_d_ff=128, image_size=32, patch_size=8, max_text_len=32,
                          contrastive_dim=32, vq_codebook_size=64),
        data=DataConfig(image_size=32, tokenizer_vocab_size=1024, shard_max_samples=200),
        train=TrainConfig(steps=20, micro_batch_size=4, lr=2e-3, warmup_steps=2, save_every=10, log_every=5),
    )


def _demo() -> Config:
    c = _tiny()
    c.preset = "demo"
    c.model = ModelConfig(name="demo", vocab_size=2048, d_model=128, n_layers=4, n_heads=4, d_ff=512, moe_every=2,
                          num_experts=8, expert_d_ff=256, image_size=32, patch_size=8, max_text_len=32,
                          contrastive_dim=64, vq_codebook_size=128)
    c.data = DataConfig(image_size=48, tokenizer_vocab_size=2048, shard_max_samples=500)
    # About four minutes on 2 CPU processes. Batch 32 and lr 1e-3: at batch 16 or lr 2e-3 the contrastive
    # head barely leaves chance in this budget; contrastive batches weighted up since retrieval is the main use.
    c.train = TrainConfig(steps=1200, micro_batch_size=32, lr=1e-3, warmup_steps=40, save_every=200, log_every=40,
                          objective_weights={"text": 0.5, "caption": 1.0, "mm": 1.0, "contrastive": 2.0})
    return c


def _base() -> Config:
    c = _demo()
    c.preset = "base"
    c.model = ModelConfig(name="base", vocab_size=32000, d_model=768, n_layers=12, n_heads=12, d_ff=3072, moe_every=2,
                          num_experts=32, expert_d_ff=3072, image_size=224, patch_size=16, max_text_len=128,
                          contrastive_dim=512, vq_codebook_size=8192)
    c.data = DataConfig(image_size=256, tokenizer_vocab_size=32000)
    c.train = TrainConfig(steps=100_000, micro_batch_size=32, lr=3e-4, warmup_steps=2000, save_every=1000, log_every=50)
    return c


def _paper(name: str, *, n_layers: int, d_ff: int, num_experts: int, num_prototypes: int = 1,
           moe_every: int = 1, share_layers: bool = False, d_model: int = 1024, n_heads: int = 16,
           dense_d_ff: int = 4096) -> Config:
    """M6 paper scales (default backbone d=1024, 16 heads); ``d_ff`` is the expert width."""
    c = _base()
    c.preset = name
    c.model = ModelConfig(name=name, vocab_size=21128, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                          d_ff=dense_d_ff, moe_every=moe_every, num_experts=num_experts, expert_d_ff=d_ff,
                          num_prototypes=num_prototypes, image_size=224, patch_size=16, max_text_len=128,
                          contrastive_dim=512, vq_codebook_size=8192, share_layers=share_layers)
    return c


PRESETS = {
    "tiny": _tiny,
    "demo": _demo,
    "base": _base,
    # Paper scales; m6.model.params.count_params gives total / active / FLOPs, and the tests
    # cross-check it against the real module built on the meta device.
    # M6 (arXiv 2103.00823, Table 3): M6-10B is a dense 50-layer transformer, d=4096, 128 heads,
    # FFN 16384 (12·50·4096² ≈ 1.0e10 parameters).
    "m6-10b": lambda: _paper("m6-10b", n_layers=50, d_model=4096, n_heads=128, dense_d_ff=16384, d_ff=16384,
                             num_experts=1, moe_every=0),
    # M6 (arXiv 2103.00823, Table 3): M6-100B keeps the 24-layer d=1024 backbone with MoE FFNs of
    # 1024 experts (d_ff 4096); MoE in every other layer gives 12·1024·2·1024·4096 ≈ 1.03e11.
    "m6-100b": lambda: _paper("m6-100b", n_layers=24, d_ff=4096, num_experts=1024, moe_every=2),
    # M6-T (arXiv 2105.15082, Sec. 4): M6-1T, 24 layers, d=1024, 960 experts of d_ff 21248 in every
    # layer, k=4 prototypes: 24·960·2·1024·21248 ≈ 1.00e12.
    "m6-1t": lambda: _paper("m6-1t", n_layers=24, d_ff=21248, num_experts=960, num_prototypes=4),
    # M6-10T (arXiv 2110.03888, Sec. 4): 48 layers, d=1024, 16 heads, 10,240 experts of d_ff 9984
    # in 80 prototypes in every layer: 48·10240·2·1024·9984 ≈ 1.005e13.
    "m6-10t": lambda: _paper("m6-10t", n_layers=48, d_ff=9984, num_experts=10240, num_prototypes=80),
}


def preset(name: str) -> Config:
    """A fresh copy of the named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' | '.join(_type_name(a) for a in args)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{where}.<key>"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", base: T | None = None) -> T:
    """Build ``cls`` from a dict, overriding fields of ``base`` when given.

    Raises:
        ConfigError: on an unknown key, a wrong type or a failed validation,
            naming the dotted field path.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}; known keys: {', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {}
    if base is not None:
        kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    for k, v in data.items():
        sub = f"{where}.{k}" if where else k
        tp = hints[k]
        if base is not None and dataclasses.is_dataclass(tp) and isinstance(v, dict):
            kwargs[k] = from_dict(tp, v, sub, base=getattr(base, k))
        else:
            kwargs[k] = _coerce(v, tp, sub)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # a required field missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def load(path: str | Path | None = None, *, preset_name: str | None = None, overrides: dict | None = None) -> Config:
    """A preset (default ``tiny``, or the file's ``preset`` key) with a JSON/YAML file and overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        text = p.read_text(encoding="utf-8")
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as e:  # parse errors from either library
            raise ConfigError(f"config file {p}: cannot parse: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
    name = preset_name or data.get("preset") or "tiny"
    if not isinstance(name, str):
        raise ConfigError(f"preset: expected str, got {type(name).__name__}")
    base = preset(name)
    merged = {k: v for k, v in data.items() if k != "preset"}
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    cfg = from_dict(Config, merged, base=base)
    cfg.preset = name
    return cfg
