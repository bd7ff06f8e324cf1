"""Metrics and monitoring (rank 0): TensorBoard scalars/histograms/images, console +
log file lines, a progress bar. :meth:`Monitor.record` is called once per optimizer
step and decides itself what to write (``logging.*`` intervals)."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import torch

from trainer.section import LoggingConfig

log = logging.getLogger("trainer")


def setup_logging(out_dir: Optional[Path], rank: int) -> None:
    """Console (rank 0: INFO, others: WARNING) and <out>/train.log on rank 0."""
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger("trainer")
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    root.addHandler(h)
    if rank == 0 and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, r = divmod(seconds, 3600)
    m, s = divmod(r, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class Monitor:
    """No-op on ranks other than 0."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 samples_per_step: int, cfg: Optional[LoggingConfig] = None) -> None:
        self.cfg = cfg or LoggingConfig()
        progress_bar = self.cfg.progress_bar
        self.enabled = enabled
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self.writer = None
        self.bar = None
        self._t0 = time.time()
        self._last_t = self._t0
        self._last_step = start_step
        self._start_step = start_step
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        show = sys.stdout.isatty() if progress_bar is None else progress_bar
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        if self.writer is not None and values is not None and values.numel() > 0:
            values = values.detach().float().cpu()
            values = values[~torch.isnan(values)]  # NaN: holes of a fixed-size sample
            if values.numel() > 0:
                self.writer.add_histogram(tag, values, step)

    def images(self, step: int, tag: str, images: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.add_images(tag, ((images[:16].detach().float().cpu() + 1) / 2).clamp(0, 1), step)

    def tick(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def line(self, step: int, epoch: int, loss: float, lr: float) -> float:
        """Console line; returns samples/s since the previous line."""
        now = time.time()
        sps = (step - self._last_step) * self.samples_per_step / max(now - self._last_t, 1e-9)
        rate = (step - self._start_step) / max(now - self._t0, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else 0.0
        self._last_t, self._last_step = now, step
        if self.enabled:
            msg = (f"step {step}/{self.total_steps} epoch {epoch} loss {loss:.4f} lr {lr:.5f} "
                   f"samples/s {sps:.1f} eta {_fmt_eta(eta)}")
            log.info(msg)
        return sps

    def should_log(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.total_steps

    def record(self, step: int, epoch: int, lr: float, loss: Optional[float], grad_norm: Optional[torch.Tensor],
               loss_scale: Callable[[], Optional[float]], head_stats: Callable[[], Mapping[str, torch.Tensor]],
               images: Optional[torch.Tensor], overflow_steps: Optional[int] = None) -> None:
        """After optimizer step ``step``: progress bar; the first batch's image grid; at logging
        steps (``loss`` given) the console line and scalars; histograms every ``hist_every``.
        ``head_stats()``: the head's statistics by tag (:meth:`trainer.heads.protocol.Head.stats`:
        0-dim tensors are scalars, 1-D ones histogram samples). Device tensors are read here,
        at those steps only."""
        self.tick(step)
        if step == 1 and self.cfg.image_grid and images is not None:
            self.images(step, "train/input", images)
        hist_now = bool(self.cfg.hist_every) and step % self.cfg.hist_every == 0
        if loss is None and not hist_now:
            return
        stats = head_stats() if self.enabled else {}
        if loss is not None:
            sps = self.line(step, epoch, loss, lr)
            vals = {"train/loss": loss, "train/lr": lr, "train/samples_per_s": sps}
            if grad_norm is not None:
                vals["train/grad_norm"] = float(grad_norm)
            scale = loss_scale()
            if scale is not None:
                vals["train/loss_scale"] = scale
            if overflow_steps is not None:  # fp16: steps skipped by the loss scaler so far
                vals["train/overflow_steps"] = overflow_steps
            vals.update({k: float(v) for k, v in stats.items() if v.dim() == 0})
            self.scalars(step, vals)
        if hist_now:
            for k, v in stats.items():
                if v.dim() >= 1:
                    self.histogram(step, k, v)

    def validation(self, step: int, accs: Optional[Mapping[str, float]], best: Mapping[str, float]) -> None:
        for name, acc in (accs or {}).items():
            self.scalars(step, {f"val/{name}": acc, f"val/{name}_best": best[name]})

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (verification, checkpointing) out of samples/s and ETA."""
        self._last_t += seconds
        self._t0 += seconds

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
