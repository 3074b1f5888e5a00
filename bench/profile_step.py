"""Where one eager training step of a large network (batch 128, CPU) spends its time: torch.profiler table.

    python bench/profile_step.py
"""
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import net  # noqa: E402

torch.manual_seed(0)
model = net.large_network()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))


def step():
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


for _ in range(5):
    step()
t0 = time.perf_counter()
for _ in range(50):
    step()
print(f'{torch.get_num_threads()} threads: {(time.perf_counter() - t0) / 50 * 1e3:.1f} ms per step')
with profile() as prof:
    for _ in range(20):
        step()
print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=12))
