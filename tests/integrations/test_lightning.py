import csv
import glob
import math
import runpy
import sys
from pathlib import Path

import lightning.pytorch as pl  # the test extra installs it
import pytest
import torch
from torch import nn

from normmatters.integrations.lightning import EffectiveLRMonitor, WeightDecayMimicCallback
from normmatters.optim import equilibrium_angular_update

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_mimic.py"


def test_the_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), str(tmp_path / "logs")])
    trainer, mimic, monitor = runpy.run_path(str(EXAMPLE), run_name="__main__")["result"]
    lazy = mimic.lazy[0]
    assert lazy.names == ["net.0.weight", "net.3.weight"] and lazy.mimic.steps == 40
    assert lazy.mimic.weight_decay == 5e-3 and lazy.rule == "rescale"
    # the optimizer keeps its decay (for the other parameters); the mimic takes it out of the conv weights' steps
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 5e-3
    (path,) = glob.glob(str(tmp_path / "logs" / "**" / "metrics.csv"), recursive=True)
    rows = [r for r in csv.DictReader(open(path)) if r.get("effective_lr/net.0.weight")]
    assert len(rows) == 4  # every 10th of 40 steps
    eq = math.degrees(equilibrium_angular_update(0.05, 5e-3, 0.9))  # the mimic's λ
    assert all(float(r["angular_update/equilibrium"]) == pytest.approx(eq) for r in rows)
    assert all(float(r[k]) > 0 for r in rows for k in r if k.startswith(("effective_lr/", "angular_update/")))
    # the effective step includes the mimic's factor: η·f/‖w‖² = η/ρ², larger than η/‖w‖² of the unshrunk weight
    w = dict(trainer.lightning_module.named_parameters())["net.0.weight"]
    plain = (0.05 / w.detach().flatten(1).norm(dim=1) ** 2).mean().item()
    assert monitor.monitors[0].latest()["effective_lr/net.0.weight"] > plain


class _Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 4 * 4, 3))

    def training_step(self, batch, i):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)


def _fit(tmp_path, callbacks, steps=4):
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 3, 6, 6),
                                                                      torch.randint(0, 3, (32,))), batch_size=8)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path), callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Net(), data)
    return trainer


def test_named_weights_every_step_with_adamw_replay(tmp_path):
    monitor = EffectiveLRMonitor(every_n_steps=1, params=["net.0.weight", "net.4.weight"],
                                 metrics=("effective_lr", "norm"))
    mimic = WeightDecayMimicCallback()
    _fit(tmp_path, [monitor, mimic])  # listed before the mimic: its hooks still run after the mimic's
    rows = list(monitor.monitors[0].history)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"effective_lr/net.0.weight", "effective_lr/net.4.weight", "norm/net.4.weight"} <= set(rows[-1])
    assert mimic.lazy[0].rule == "replay" and mimic.lazy[0].names == ["net.0.weight"]
    assert not any("equilibrium" in k for k in rows[-1])  # AdamW: the SGD equilibrium does not apply
    assert "angular_update/net.0.weight" not in open(glob.glob(str(tmp_path / "**" / "metrics.csv"),
                                                               recursive=True)[0]).readline()
    with pytest.raises(ValueError, match="unknown metrics"):
        EffectiveLRMonitor(metrics=("lr",))
    with pytest.raises(ValueError, match="rule must be one of"):
        WeightDecayMimicCallback(rule="scale")
