"""Grid carbon intensity, facility overhead, and published training-energy figures to compare against."""

from __future__ import annotations

from m6.config import ConfigError, EnergyConfig

GRID_SOURCE = ("Ember, Yearly Electricity Data (2023 annual averages of life-cycle grid emissions), rounded; "
               "Patterson et al. 2021 (arXiv 2104.10350) for the 2020 US average they used. Set "
               "energy.grid_gco2_per_kwh for a figure from your provider or a live source.")
GRID_GCO2_PER_KWH: dict[str, float] = {
    "world": 480.0,
    "china": 580.0,
    "usa": 370.0,
    "us-2020-patterson": 429.0,
    "eu": 250.0,
    "germany": 380.0,
    "france": 55.0,
    "uk": 240.0,
    "sweden": 40.0,
    "norway": 30.0,
    "india": 710.0,
    "japan": 480.0,
    "singapore": 470.0,
}

# Patterson et al. 2021, "Carbon Emissions and Large Neural Network Training" (arXiv 2104.10350), Table 4:
# energy includes their datacentre PUE. Tokens: GPT-3 from Brown et al. 2020 (300B); GShard-600B from
# Lepikhin et al. 2020 (4M-token batches × 250k steps ≈ 1T); Switch's token count is not in that table.
PUBLISHED: list[dict] = [
    {"model": "GPT-3 (175B, dense)", "energy_mwh": 1287.0, "co2e_t": 552.0, "train_flops": 3.14e23,
     "tokens": 300e9},
    {"model": "Switch Transformer (1.5T, MoE)", "energy_mwh": 179.0, "co2e_t": 59.0, "train_flops": 8.22e22,
     "tokens": None},
    {"model": "GShard-600B (MoE)", "energy_mwh": 24.1, "co2e_t": 4.3, "train_flops": 1.33e22,
     "tokens": 1.0e12},
]

J_PER_KWH = 3.6e6
J_PER_MWH = 3.6e9


def grid_intensity(cfg: EnergyConfig) -> dict:
    """The grid carbon intensity to use: the override, else the configured region from the table.

    Raises:
        ConfigError: an unknown region without an override, naming the known ones.
    """
    if cfg.grid_gco2_per_kwh is not None:
        return {"region": cfg.grid_region, "gco2_per_kwh": cfg.grid_gco2_per_kwh,
                "source": "energy.grid_gco2_per_kwh (configured override)"}
    region = cfg.grid_region.lower()
    if region not in GRID_GCO2_PER_KWH:
        raise ConfigError(f"energy.grid_region: unknown region {cfg.grid_region!r}; known: "
                          f"{', '.join(GRID_GCO2_PER_KWH)} (or set energy.grid_gco2_per_kwh)")
    return {"region": region, "gco2_per_kwh": GRID_GCO2_PER_KWH[region], "source": GRID_SOURCE}


def carbon_g(it_energy_j: float, pue: float, gco2_per_kwh: float) -> float:
    """Grams CO2e of ``it_energy_j`` joules drawn by IT equipment in a facility with ``pue``."""
    return it_energy_j * pue / J_PER_KWH * gco2_per_kwh


def comparisons(facility_energy_j: float, tokens: int, flops: float | None) -> list[dict]:
    """This run against the published figures, per FLOP and per token (facility energy on both sides).

    A ratio is ``None`` where the run or the reference lacks the quantity.
    """
    rows = []
    run_j_per_token = facility_energy_j / tokens if tokens else None
    run_j_per_flop = facility_energy_j / flops if flops else None
    for ref in PUBLISHED:
        ref_j = ref["energy_mwh"] * J_PER_MWH
        ref_j_per_flop = ref_j / ref["train_flops"]
        ref_j_per_token = ref_j / ref["tokens"] if ref["tokens"] else None
        rows.append({
            "model": ref["model"], "energy_mwh": ref["energy_mwh"], "co2e_t": ref["co2e_t"],
            "train_flops": ref["train_flops"], "tokens": ref["tokens"],
            "j_per_flop": ref_j_per_flop, "j_per_token": ref_j_per_token,
            "run_vs_ref_per_flop": run_j_per_flop / ref_j_per_flop if run_j_per_flop else None,
            "run_vs_ref_per_token": (run_j_per_token / ref_j_per_token
                                     if run_j_per_token and ref_j_per_token else None),
        })
    return rows


def m6_claims() -> list[dict]:
    """What M6's published energy claims imply, stated as numbers one can check a run against.

    The "1 % of GPT-3's energy" claim made for M6-10T implies 12.9 MWh. M6-10T
    (arXiv 2110.03888) reports pretraining on 512 V100 GPUs in about 10 days; at
    the V100's 300 W board power and PUE 1.1 that schedule draws at most ~40.6 MWh,
    so the 1 % claim requires an average draw near 32 % of board power (or fewer
    GPU-days than the headline).
    """
    gpt3_mwh = PUBLISHED[0]["energy_mwh"]
    implied_mwh = 0.01 * gpt3_mwh
    gpus, days, board_w, pue = 512, 10, 300.0, 1.1
    bound_mwh = gpus * days * 24 * board_w * pue / 1e6
    return [
        {"claim": "M6-10T used 1% of GPT-3's training energy", "implied_mwh": implied_mwh,
         "basis": f"1% of {gpt3_mwh:g} MWh (Patterson et al. 2021)"},
        {"claim": "M6-10T pretrained on 512 V100 GPUs in ~10 days (arXiv 2110.03888)", "implied_mwh": bound_mwh,
         "basis": f"upper bound: {gpus} GPUs × {days * 24} h × {board_w:g} W board power × PUE {pue:g}"},
        {"claim": "average GPU draw the 1% claim needs", "implied_mwh": None,
         "basis": f"{implied_mwh / bound_mwh:.0%} of V100 board power over the 10 days"},
    ]
