"""Quick start: swap nn.BatchNorm2d for L1 batch norm, train a few steps, convert back for export."""

import torch
from torch import nn

import normmatters as nm

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
model = nm.convert_batchnorm(model, norm="l1")          # every BatchNorm2d → LpBatchNorm2d(norm="l1")
print(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x, target = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
for step in range(20):
    loss = nn.functional.cross_entropy(model(x), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 5 == 0:
        print(f"step {step:2d}  loss {loss.item():.4f}")
model.eval()
with torch.no_grad():
    before = model(x)
    exported = nm.to_torch_batchnorm(model)             # in place: stock nn.BatchNorm2d, same eval output
    print("max |Δ| after converting back:", (exported(x) - before).abs().max().item())
