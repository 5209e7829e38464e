"""A one-process stand-in for a DeepSpeed ZeRO-0 engine: the calls ``MultiTaskGradients`` and the
loop's step make, with DeepSpeed's semantics for one rank (the loss divided by the accumulation
steps in ``backward``, gradients in ``param.grad``, one optimizer step), so the hot-path tests
(``test_gpu_hot_path``, ``test_train_gpu``) run the real step code without starting DeepSpeed
in the pytest process (its ``init_distributed`` would stay for the other tests)."""

from __future__ import annotations

import torch


class Zero0Engine:
    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, gas: int, device
    ) -> None:
        self.module, self.optimizer, self.gas = model, optimizer, gas
        self.device = torch.device(device)

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        (loss / self.gas).backward(retain_graph=retain_graph)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_gradient_accumulation_boundary(self, value: bool) -> None:
        pass

    def zero_optimization_stage(self) -> int:
        return 0

    def gradient_accumulation_steps(self) -> int:
        return self.gas

    def managed_gradient_accumulation(self) -> bool:
        return True

    def zero_cpu_offload(self) -> bool:
        return False

    def zero_nvme_offload_optimizer(self) -> bool:
        return False
