"""A training process for the Prometheus test: the tiny M6Model trained on synthetic batches, monitored, /metrics served.

argv: output folder, steps. Writes ``port`` once /metrics is up, ``energy.json`` and the
report after training (then ``done``), then keeps serving until ``release`` appears (so the final
figures can be scraped), at most 60 s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from m6.config import EnergyConfig, preset
from m6.energy.monitor import EnergyMonitor
from m6.energy.report import render
from m6.model.m6 import M6Model


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    cfg = preset("tiny").model
    model = M6Model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = EnergyMonitor(EnergyConfig(sample_hz=10), run_id="prom-train").start()
    port = mon.serve_metrics(0, "127.0.0.1")
    (out / "port").write_text(str(port))
    B, T = 4, cfg.max_text_len
    with mon.window("train"):
        for step in range(steps):
            text = torch.randint(5, cfg.vocab_size, (B, T))
            text[:, 0], text[:, -1] = 1, 2
            batch = {"image": torch.rand(B, 3, cfg.image_size, cfg.image_size) * 2 - 1, "text": text}
            loss = model(batch, "caption" if step % 2 else "text")["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step + 1, B * T)
            time.sleep(0.05)  # spread the run over a few scrapes
    mon.stop()
    mon.write(str(out / "energy.json"))
    render(str(out))
    (out / "done").write_text("")
    deadline = time.monotonic() + 60
    while not (out / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    mon.close()


if __name__ == "__main__":
    main()
