import runpy
import sys
from pathlib import Path

import torch
import transformers  # the test extra installs it
from torch import nn

from normmatters.integrations.transformers import EffectiveLRCallback

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_mimic.py"


def test_the_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), str(tmp_path / "out")])
    trainer, mimic = runpy.run_path(str(EXAMPLE), run_name="__main__")["result"]
    assert mimic.lazy.names == ["net.0.weight", "net.3.weight"] and mimic.lazy.rule == "replay"
    assert mimic.lazy.mimic.steps == 40 and mimic.lazy.mimic.weight_decay == 0.1
    logged = [h for h in trainer.state.log_history if "effective_lr/net.0.weight" in h]
    assert [h["step"] for h in logged] == [10, 20, 30, 40]
    assert all(h["angular_update/net.3.weight"] > 0 and "loss" in h for h in logged)


class _Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 4 * 4, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_loggers_listed_before_the_callback_receive_its_values(tmp_path):
    seen = []

    class Logger(transformers.TrainerCallback):  # stands where TensorBoard's or W&B's callback would
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(sorted(k for k in logs if k.startswith(("effective_lr/", "angular_update/"))))

    torch.manual_seed(0)
    ds = [{"x": torch.randn(3, 6, 6), "labels": torch.tensor(i % 3)} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                          logging_steps=2, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, optim="sgd", learning_rate=0.1, weight_decay=1e-3)
    callback = EffectiveLRCallback(every_n_steps=2, metrics=("effective_lr", "angular_update"))
    trainer = transformers.Trainer(model=_Wrapped(), args=args, train_dataset=ds, callbacks=[Logger(), callback])
    assert trainer.callback_handler.callbacks[0] is callback  # moved in front of the loggers
    trainer.train()
    assert seen[:2] == [["angular_update/equilibrium", "angular_update/net.0.weight", "effective_lr/net.0.weight"]] * 2
    assert [r["step"] for r in callback.monitor.history] == [2, 4]
