"""Hugging Face Trainer: train a small CNN whose conv weights (each followed by batch norm) get no weight decay,
while the decay's effect is reproduced online; the effective learning rate η/‖w‖ (AdamW) and the angular update
per step of those weights join the Trainer's logs, so every logger it reports to receives them.

    pip install normmatters[transformers]
    python examples/hf_trainer_mimic.py [OUTPUT_DIR]     # a few seconds on a CPU

The Trainer builds its AdamW with ``weight_decay`` as usual: ``WeightDecayMimicCallback`` finds the scale-invariant
weights at the first step, takes AdamW's decoupled decay out of their steps and replays it (the "replay" rule);
the other parameters keep their decay. ``EffectiveLRCallback`` adds ``effective_lr/<layer>`` and
``angular_update/<layer>`` (degrees per step) to the logs of every logging step (``logging_steps``).
"""

import sys

import torch
import transformers
from torch import nn

from normmatters.integrations.transformers import EffectiveLRCallback, WeightDecayMimicCallback


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def main(output_dir: str = "hf_trainer_mimic", steps: int = 40):
    torch.manual_seed(0)
    x, y = torch.randn(256, 3, 12, 12), torch.randint(0, 10, (256,))
    data = [{"pixel_values": x[i], "labels": y[i]} for i in range(len(x))]
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=32, learning_rate=3e-3,
        weight_decay=0.1, logging_steps=10, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    mimic = WeightDecayMimicCallback()
    trainer = transformers.Trainer(model=SmallCNN(), args=args, train_dataset=data,
                                   callbacks=[mimic, EffectiveLRCallback()])
    trainer.train()
    print(f"mimicked weights: {mimic.lazy.names} (rule {mimic.lazy.rule})")
    print(trainer.state.log_history[-2])  # the last logging step's record
    return trainer, mimic


if __name__ == "__main__":
    result = main(*sys.argv[1:2])
