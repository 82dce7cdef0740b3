"""The training loop shared by every phase: CUDA-graph replay of whole steps, a clock, a schedule, a loss log."""

# A step function does everything on the device (draws its batch, forward, backward, clipping,
# optimizer step) and returns a small tensor of losses. On CUDA the whole step is captured once
# into a CUDA graph and replayed, which removes the per-kernel launch cost that made the pilot's
# eager training launch-bound (140 ms per step); when capture fails the loop runs the same step
# eagerly and says so. The learning rate follows a linear warm-up and a cosine decay over the
# run's progress, the larger of steps done / ``max_steps`` and time spent / ``seconds``, so a run
# limited by the clock still anneals to zero before it stops.

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device`` (nothing when None), with the cache off as CUDA graph capture needs."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype, cache_enabled=False)


def make_adamw(params: Sequence[torch.nn.Parameter], lr: float, device: torch.device, weight_decay: float = 0.0):
    """AdamW: fused and capturable with a tensor learning rate on CUDA (graph-safe), plain elsewhere."""
    if device.type == "cuda":
        lr_t = torch.tensor(lr, dtype=torch.float32, device=device)
        return torch.optim.AdamW(params, lr=lr_t, weight_decay=weight_decay, fused=True, capturable=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def set_lr(opt: torch.optim.Optimizer, value: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)  # in place: a captured graph reads this tensor
        else:
            group["lr"] = value


def lr_at(peak: float, step: int, progress: float, warmup_steps: int) -> float:
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    return peak * warm * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def make_runner(
    step: Callable[[], torch.Tensor], device: torch.device, use_graphs: bool, warmup: int = 3
) -> tuple[Callable[[], torch.Tensor], str, int]:
    """Return (run one step, mode, steps already run while warming up)."""
    if device.type != "cuda" or not use_graphs:
        return step, "eager", 0
    try:
        # Warm-up on a side stream (cuDNN autotuning, lazy allocations), as CUDA graph capture needs.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()
        graph.replay()
        torch.cuda.synchronize(device)
    except Exception as exc:  # any capture failure: fall back to the same step, eagerly
        try:
            torch.cuda.synchronize(device)
        except Exception:
            pass
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        why = f"{type(exc).__name__}: {msg}"
        print(f"memloc train: CUDA graph capture failed ({why}); running eagerly", file=sys.stderr)
        return step, f"eager (graph capture failed: {why})", warmup

    def replay() -> torch.Tensor:
        graph.replay()
        return static_out

    return replay, "cuda_graph", warmup + 1


@dataclass
class LoopResult:
    """What a training phase did: steps, mode, speed, loss curve (step, *values) and why it stopped."""

    steps: int = 0
    mode: str = ""
    seconds: float = 0.0
    ms_per_step: float = float("nan")
    value_names: tuple[str, ...] = ()
    curve: list[tuple] = field(default_factory=list)
    stopped_by: str = ""
    error: str | None = None

    def final(self) -> dict[str, float]:
        if not self.curve:
            return {}
        return dict(zip(self.value_names, self.curve[-1][1:]))

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "mode": self.mode,
            "seconds": round(self.seconds, 2),
            "ms_per_step": round(self.ms_per_step, 3),
            "stopped_by": self.stopped_by,
            "error": self.error,
            "final": self.final(),
            "curve": {"columns": ["step", *self.value_names], "rows": [list(r) for r in self.curve]},
        }


def run_loop(
    step: Callable[[], torch.Tensor],
    opt: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    *,
    device: torch.device,
    lr: float,
    warmup_steps: int,
    max_steps: int,
    seconds: float,
    value_names: Sequence[str],
    log_every: int = 25,
    use_graphs: bool = True,
    desc: str = "train",
) -> LoopResult:
    """Run ``step`` until ``max_steps`` or ``seconds`` (whichever first), with the schedule above.

    Every ``log_every`` steps the losses are averaged into the curve (the only host sync) and
    the weights are snapshotted; a non-finite loss restores the last snapshot and stops.
    """
    res = LoopResult(value_names=tuple(value_names))
    seconds = max(float(seconds), 1e-3)
    max_steps = max(int(max_steps), 1)
    t_start = time.perf_counter()
    set_lr(opt, lr_at(lr, 0, 0.0, warmup_steps))
    runner, res.mode, done = make_runner(step, device, use_graphs)
    snapshot = [p.detach().clone() for p in params]
    acc = torch.zeros(len(value_names), device=device)
    n_acc = 0
    step_idx = done
    t_sync, step_sync = time.perf_counter(), step_idx
    t_loop, step_loop = t_sync, step_idx
    sec_per_step = 0.0
    interactive = sys.stderr.isatty()
    bar = tqdm(total=max(int(seconds), 1), desc=desc, unit="s", mininterval=1.0 if interactive else 30.0, leave=False)
    try:
        while True:
            progress = max(step_idx / max_steps, (t_sync - t_start + (step_idx - step_sync) * sec_per_step) / seconds)
            set_lr(opt, lr_at(lr, step_idx, progress, warmup_steps))
            acc += runner()
            n_acc += 1
            step_idx += 1
            if n_acc < log_every and step_idx < max_steps:
                continue
            values = (acc / n_acc).tolist()  # host sync
            acc.zero_()
            n_acc = 0
            now = time.perf_counter()
            if not all(math.isfinite(v) for v in values):
                with torch.no_grad():
                    torch._foreach_copy_(list(params), snapshot)
                res.stopped_by = "non-finite loss"
                last = res.curve[-1][0] if res.curve else 0
                res.error = f"non-finite loss by step {step_idx}; weights restored from step {last}"
                break
            res.curve.append((step_idx, *(round(v, 6) for v in values)))
            with torch.no_grad():
                torch._foreach_copy_(snapshot, list(params))
            sec_per_step = (now - t_sync) / max(step_idx - step_sync, 1)
            bar.update(min(int(now - t_start), bar.total) - bar.n)
            bar.set_postfix_str(f"step {step_idx} loss {values[0]:.4f}", refresh=False)
            t_sync, step_sync = now, step_idx
            if step_idx >= max_steps:
                res.stopped_by = "max_steps"
                break
            if now - t_start >= seconds:
                res.stopped_by = "time"
                break
    finally:
        bar.close()
    res.steps = step_idx
    res.seconds = time.perf_counter() - t_start
    if step_idx > step_loop:
        res.ms_per_step = 1000.0 * (t_sync - t_loop) / (step_idx - step_loop)
    return res
