"""Lightning: train a small CNN whose conv weights (each followed by batch norm) get no weight decay, while the
decay's effect — a shrinking norm, a growing effective step — is reproduced online; the effective learning rate
η/‖w‖² and the angular update per step of those weights are logged next to the loss.

    pip install normmatters[lightning]
    python examples/lightning_mimic.py [LOG_DIR]      # a few seconds on a CPU; logs to LOG_DIR (lightning_logs)

The optimizer is configured as usual, with weight_decay: ``WeightDecayMimicCallback`` finds the scale-invariant
weights at the first step, takes the decay out of their steps and reproduces it by its rule ("rescale" for SGD,
"replay" for AdamW); the other parameters keep their decay. ``EffectiveLRMonitor`` logs ``effective_lr/<layer>``,
``angular_update/<layer>`` (degrees per step) and ``angular_update/equilibrium`` (√(2ηλ/(1+μ)), the angular
update weight decay leads to) through the trainer's loggers (CSV here; TensorBoard, W&B alike).
"""

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from normmatters.integrations.lightning import EffectiveLRMonitor, WeightDecayMimicCallback


class SmallCNN(pl.LightningModule):
    def __init__(self, lr: float = 0.05, weight_decay: float = 5e-3) -> None:
        super().__init__()
        self.lr, self.weight_decay = lr, weight_decay
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)


def main(log_dir: str = "lightning_logs", steps: int = 40):
    torch.manual_seed(0)
    x, y = torch.randn(256, 3, 12, 12), torch.randint(0, 10, (256,))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    mimic, monitor = WeightDecayMimicCallback(), EffectiveLRMonitor(every_n_steps=10)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=CSVLogger(log_dir, name="mimic"),
                         callbacks=[mimic, monitor], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=10)
    trainer.fit(SmallCNN(), data)
    last = monitor.monitors[0].latest()
    print(f"mimicked weights: {mimic.lazy[0].names}; logged to {trainer.logger.log_dir}")
    print(", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.split("/")[0] != "norm"))
    return trainer, mimic, monitor


if __name__ == "__main__":
    result = main(*sys.argv[1:2])
