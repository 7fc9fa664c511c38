"""PyTorch (CPU, channels_last) worker: the study's models, Adam, batch B.

    python torch_worker.py --model=xray_light --k=5 --size=128 --batch=64 [--compile]
"""


import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from worker_protocol import parse_args, serve


def same_pad(k):
    return (k - 1) // 2  # stride 1, odd kernels: TF 'SAME' is symmetric


class LightConv2d(nn.Module):
    def __init__(self, c, f, ks, k):
        super().__init__()
        self.c1 = nn.Conv2d(c, k, ks, padding=same_pad(ks))
        self.c2 = nn.Conv2d(k, f, ks, padding=same_pad(ks))

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


class XrayLight(nn.Module):
    def __init__(self, k):
        super().__init__()
        blocks, c = [], 3
        for f in (8, 16, 32):
            blocks.append(nn.ModuleList([LightConv2d(c, f, 3, k), nn.BatchNorm2d(f, eps=1e-3, momentum=0.01),
                                         LightConv2d(f, f, 3, k), nn.BatchNorm2d(f, eps=1e-3, momentum=0.01),
                                         LightConv2d(c, f, 1, k), nn.BatchNorm2d(f, eps=1e-3, momentum=0.01)]))
            c = f
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        for c1, b1, c2, b2, sc, bs in self.blocks:
            a = b2(c2(F.relu(b1(c1(x)))))
            x = F.max_pool2d(F.relu(a + bs(sc(x))), 2)
        return self.head(x.mean((2, 3)))


class XrayConv2d(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for f in (8, 16, 32):
            for _ in range(3):
                layers += [nn.Conv2d(c, f, 3), nn.ReLU(), nn.BatchNorm2d(f, eps=1e-3, momentum=0.01)]
                c = f
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def main():
    a = parse_args(("--compile", {"action": "store_true"}))

    def build():
        model = XrayLight(a.k) if a.model == "xray_light" else XrayConv2d()
        model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        rng = np.random.default_rng(0)
        x = torch.from_numpy(rng.uniform(size=(a.batch, 3, a.size, a.size)).astype(np.float32))
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(rng.integers(0, 2, size=(a.batch,)))
        fwd = torch.compile(model) if a.compile else model

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
            loss.item()  # synchronise

        trainable = sum(p.numel() for p in model.parameters())
        buffers = sum(b.numel() for n, b in model.named_buffers() if not n.endswith("num_batches_tracked"))
        return step, {"framework": "torch " + torch.__version__ + (" compile" if a.compile else ""),
                      "total_params": int(trainable + buffers), "trainable_params": int(trainable),
                      "threads": torch.get_num_threads()}

    serve(build)


if __name__ == "__main__":
    main()
