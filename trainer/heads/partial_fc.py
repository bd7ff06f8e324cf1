"""Partial FC: the model-parallel margin-softmax classifier, with UNPG (docs/design.md §1-2).

Every rank holds a contiguous shard of class centres and sees the global batch
(all-gathered embeddings and labels). The loss is the mean over the global
batch and is the same scalar on every rank:

    L = mean_i [ -z_{i,y_i} + log( sum_c exp(z_ic) + exp(V_i) ) ]

where ``V_i`` is UNPG's log-sum-exp over the kept negative pairs (absent when
UNPG is off or there is no negative pair). ``V`` is one scalar for the whole
global batch (``negatives="global"``) or, for ``negatives="local"``, the scalar
of the rank that owns row i, computed from that rank's batch alone.

Gradients: after ``loss.backward()`` each rank's local embeddings hold exactly
d L / d(local rows) — no world-size factor. DDP averages backbone gradients over
ranks, so the trainer multiplies by the world size (see trainer docs).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from trainer.collectives import (
    ProcessGroup,
    all_gather_object_ints,
    all_gather_rows,
    class_range,
    scale_grad,
    world_info,
)
from trainer.heads.adaptive import AdaptiveMargin
from trainer.heads.config import sample_rate_ok
from trainer.heads.margins import Margin, SoftmaxMargin
from trainer.heads.softmax import margin_softmax_parts
from trainer.heads.unpg import UNPG, metric_negatives_lse, sharded_metric_negatives_lse

log = logging.getLogger("trainer.heads")

# Per-rank input problems, exchanged before any data collective so that every
# rank raises the same error instead of leaving the others hanging.
_BAD_EMB_SHAPE, _BAD_LABEL_SHAPE, _BAD_LABEL_DTYPE = 1, 2, 4
_SHOWN_BAD = 10  # bad label values named in the error


def _host_list(t: torch.Tensor) -> List[Any]:
    """``t.tolist()`` (nested Python numbers; unannotated in torch: one typed door)."""
    return cast(List[Any], t.tolist())  # pyright: ignore[reportUnknownMemberType]


class PartialFC(nn.Module):
    """Model-parallel margin softmax with optional Partial FC sampling and UNPG.

    Args:
        margin: ``ArcFace``, ``CosFace``, ``CombinedMargin``, ``AdaFace``, ``MagFace`` or
            ``CurricularFace`` (carries the scale ``s``; the last three keep their
            running state in buffers of the submodule ``margin``).
        embedding_size: D.
        num_classes: C, the total over all ranks.
        sample_rate: fraction of each shard's centres used per step (1.0 = all).
        unpg: ``UNPG(...)`` to add the metric negatives, ``None`` for plain margin softmax.
        process_group: group the classes are sharded over (default: the world, or
            no group at all in a single process).
        chunk_elements: size of the [N, chunk] logit blocks (memory/speed knob);
            default 2^21 on CPU (8 MB blocks), 2^26 on CUDA.
        init_std: centres are initialised N(0, init_std^2) (insightface: 0.01).
    """

    def __init__(
        self,
        margin: SoftmaxMargin,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        unpg: Optional[UNPG] = None,
        process_group: ProcessGroup = None,
        chunk_elements: Optional[int] = None,
        init_std: float = 0.01,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if not isinstance(margin, (Margin, AdaptiveMargin)):
            raise TypeError("margin must be ArcFace/CosFace/CombinedMargin/AdaFace/MagFace/CurricularFace, "
                            f"got {type(margin).__name__}")
        if not sample_rate_ok(sample_rate):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        # a runtime check for callers the type checker does not see (a YAML-built config, a test)
        if unpg is not None and not isinstance(unpg, UNPG):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"unpg must be a trainer.heads.UNPG or None, got {type(unpg).__name__}")
        if dtype not in (torch.float32, torch.float64, torch.bfloat16):
            raise TypeError(f"PartialFC: centres are stored in float32, float64 or bfloat16 "
                            f"(loss.state_dtype: fp32 | bf16), got {dtype}")
        # the margin/softmax math: float64 for a float64 head, else float32 (also for bf16 state)
        if isinstance(margin, AdaptiveMargin):
            # a submodule: its running state (buffers) is part of the head's state_dict
            margin = margin.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        self.margin: SoftmaxMargin = margin
        self.unpg = unpg
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.sample_rate, self.chunk_elements = float(sample_rate), chunk_elements
        self.process_group = process_group
        self.rank, self.world_size = world_info(process_group)
        if self.num_classes < self.world_size:
            raise ValueError(f"num_classes={num_classes} is smaller than the world size {self.world_size}")
        self.class_range: Tuple[int, int] = class_range(self.num_classes, self.rank, self.world_size)
        start, stop = self.class_range
        if dtype == torch.bfloat16:
            # drawn in float32 and rounded, a block of rows at a time (no float32 copy of the shard)
            self.weight = nn.Parameter(torch.empty(stop - start, self.embedding_size, dtype=dtype, device=device))
            step = max(1, (1 << 22) // max(1, self.embedding_size))
            with torch.no_grad():
                for a in range(0, stop - start, step):
                    block = self.weight[a : a + step]
                    block.copy_(torch.empty(block.shape, device=device).normal_(0, init_std))
        else:
            self.weight = nn.Parameter(
                torch.empty(stop - start, self.embedding_size, dtype=dtype, device=device).normal_(0, init_std)
            )
        self.sampled_classes: Optional[torch.Tensor] = None
        # Statistics of the last forward: 0-dim detached device tensors (no host sync);
        # "batch" is a Python number. Convert them at logging steps only.
        self.last_stats: Dict[str, Union[torch.Tensor, float]] = {}
        self._margin_stats: Dict[str, torch.Tensor] = {}  # snapshots of the margin's running state
        # Input checks (see _exchange_sizes, check_inputs): cached sizes, device-side record.
        self.eager_checks = 1
        self._steps = 0
        self._size_key: Optional[Tuple[int, int]] = None
        self._sizes: Optional[List[int]] = None
        self._label_check = torch.zeros(3 + _SHOWN_BAD, dtype=torch.float64, device=device)
        self._size_log: Dict[int, List[int]] = {}  # first step -> sizes, since the last check

    @property
    def compute_dtype(self) -> torch.dtype:
        """The margin/softmax math: float64 for a float64 head, else float32 (bf16 state too)."""
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    @property
    def state_bytes_per_class(self) -> int:
        """Bytes per class of the centre and its momentum (PartialFCSGD): 2 x D x itemsize."""
        return 2 * self.embedding_size * self.weight.element_size()

    @property
    def num_local(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"class_range={self.class_range}, sample_rate={self.sample_rate}, unpg={self.unpg}"
        )

    # ------------------------------------------------------------------ inputs
    def _exchange_sizes(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> List[int]:
        """Batch sizes of all ranks (rank order); shape/dtype problems raise on every rank.

        Exchanged (one tiny all-gather read on the host) only when this rank's batch
        size or shape problems differ from the previous step's: Python facts, known
        without a sync. Ranks change their batch size in the same step (a last, short
        batch of a drop_last=False sampler) or never (the trainer: drop_last=True).
        """
        problems = 0
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            problems |= _BAD_EMB_SHAPE
        if local_labels.dim() != 1 or local_labels.shape[0] != local_embeddings.shape[0]:
            problems |= _BAD_LABEL_SHAPE
        if local_labels.dtype == torch.bool or local_labels.is_complex():
            problems |= _BAD_LABEL_DTYPE
        key = (int(local_embeddings.shape[0]), problems)
        if self._sizes is not None and key == self._size_key:
            return self._sizes
        info: List[List[int]] = _host_list(all_gather_object_ints(list(key), self.process_group))  # CPU ints
        if any(p for _, p in info):
            lines: List[str] = []
            for r, (_b, p) in enumerate(info):
                if p & _BAD_EMB_SHAPE:
                    lines.append(f"rank {r}: embeddings must be [batch, {self.embedding_size}]")
                if p & _BAD_LABEL_SHAPE:
                    lines.append(f"rank {r}: labels must be a 1-D tensor with one label per embedding")
                if p & _BAD_LABEL_DTYPE:
                    lines.append(f"rank {r}: labels must be integer class ids")
            raise ValueError(f"PartialFC got bad inputs at step {self._steps + 1}:\n  " + "\n  ".join(lines))
        self._size_key, self._sizes = key, [int(b) for b, _ in info]
        self._size_log[self._steps + 1] = self._sizes  # to name the rank of a bad label later
        return self._sizes

    def _validate_labels(self, global_labels: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """int64 global labels; bad ones (not an integer in [0, C)) recorded on the device.

        The first step with a bad label keeps (step, first bad row, up to 10 sorted bad
        values) in ``_label_check``; :meth:`check_inputs` reads it (one sync) and raises.
        Bad labels are mapped to -1 (no class: no target) so the step itself runs.
        The labels are the gathered global ones: every rank records the same.
        """
        bad = (global_labels != torch.floor(global_labels)) | (global_labels < 0) | (
            global_labels >= self.num_classes
        )
        n = global_labels.shape[0]
        step = float(self._steps + 1)
        with torch.no_grad():
            if n:
                row = torch.where(bad, torch.arange(n, device=bad.device, dtype=torch.float64),
                                  torch.full((), float(n), dtype=torch.float64, device=bad.device)).amin()
                values = torch.where(bad, global_labels, float("nan")).sort().values[:_SHOWN_BAD]
                values = F.pad(values, (0, _SHOWN_BAD - values.numel()), value=float("nan"))
                record = torch.cat([torch.stack([torch.full_like(row, step), row, bad.sum().double()]), values])
                check = self._label_check.to(global_labels.device)
                first = (check[0] == 0) & (record[2] > 0)  # nothing recorded yet, bad now
                self._label_check = torch.where(first, record, check)
        return torch.where(bad, -1.0, global_labels).to(torch.int64)

    def check_inputs(self) -> None:
        """Raise (on every rank alike) if a step since the last check had a bad label.

        One host sync: call it at logging steps. The first ``eager_checks`` steps check
        at once, so bad input of a fresh run stops it immediately.
        """
        check: List[float] = _host_list(self._label_check.cpu())  # the one sync
        step, row, count = int(check[0]), int(check[1]), int(check[2])
        sizes = self._size_log.get(max((k for k in self._size_log if k <= step), default=-1), [])
        if self._size_log:  # keep only the sizes in force now
            last = max(self._size_log)
            self._size_log = {last: self._size_log[last]}
        if step == 0:
            return
        values = list(dict.fromkeys(int(v) if float(v).is_integer() else v for v in check[3:] if v == v))
        rank, lo = 0, 0
        for r, b in enumerate(sizes):
            if lo <= row < lo + b:
                rank = r
                break
            lo += b
        self._label_check = torch.zeros_like(self._label_check)
        raise ValueError(
            f"PartialFC: labels must be integers in [0, {self.num_classes}); at step {step} (the head's "
            f"forward call {step}) "
            f"got {count} bad label(s) in the global batch, the first from rank {rank}, e.g. {values}"
        )

    # ---------------------------------------------------------------- sampling
    def num_sampled(self, global_batch: int) -> int:
        """Centres used per step on this rank: ``min(C_local, max(floor(r C_local), N))``.

        N (the global batch) bounds the positives that can fall in the shard, so
        every positive fits; the count depends on no label (docs/design.md §2).
        """
        if self.sample_rate >= 1.0:
            return self.num_local
        return min(self.num_local, max(math.floor(self.sample_rate * self.num_local), int(global_batch)))

    def _select_centres(self, global_labels: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Rows of the shard used this step and, per global row, the target's position among them."""
        start, stop = self.class_range
        in_shard = (global_labels >= start) & (global_labels < stop)
        local_label = torch.where(in_shard, global_labels - start, torch.full_like(global_labels, -1))
        if self.sample_rate >= 1.0:
            self.sampled_classes = None
            return None, local_label
        num_sample = self.num_sampled(global_labels.shape[0])
        # Uniform random others: random scores in [0, 1), positives forced to 2 (top-k keeps
        # them all: at most N <= num_sample of them). Out-of-shard labels go to a dummy slot.
        scores = torch.rand(self.num_local + 1, device=self.weight.device)
        slot = torch.where(in_shard, local_label, torch.full_like(local_label, self.num_local))
        scores.index_fill_(0, slot, 2.0)
        rows = torch.topk(scores[: self.num_local], num_sample, sorted=False).indices.sort().values
        target_pos = torch.where(
            in_shard, torch.searchsorted(rows, local_label.clamp_min(0)), torch.full_like(local_label, -1)
        )
        self.sampled_classes = rows + start
        return rows, target_pos

    # ----------------------------------------------------------------- forward
    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over the global batch; the same float32 (or float64) scalar on every rank."""
        group = self.process_group
        sizes = self._exchange_sizes(local_embeddings, local_labels)
        # float64 holds every int below 2^53 exactly, and lets us name non-integer values.
        global_labels = all_gather_rows(
            local_labels.detach().reshape(-1).to(torch.float64), sizes, group
        )
        global_labels = self._validate_labels(global_labels, sizes)
        self._steps += 1
        if self._steps <= self.eager_checks:
            self.check_inputs()
        device_type = local_embeddings.device.type
        # Softmax and UNPG log-sum-exp in float32 whatever the autocast state (float64 if the head is).
        compute_dtype = self.compute_dtype
        with torch.autocast(device_type=device_type, enabled=False):
            local_x = local_embeddings.to(compute_dtype)
            global_x = all_gather_rows(local_x, sizes, group)
            global_labels = global_labels.to(local_x.device)
            rows, target_pos = self._select_centres(global_labels)
            elements = self.chunk_elements or (1 << 26 if global_x.is_cuda else 1 << 21)
            chunk = max(1, elements // max(1, global_x.shape[0]))
            lse, target = margin_softmax_parts(
                global_x, self.weight, rows, target_pos, self.margin, group, chunk
            )
            denominator = lse
            stats: Dict[str, Union[torch.Tensor, float]] = {"batch": float(global_x.shape[0])}
            if self.unpg is not None:
                # V = -inf (no negative pair) adds exactly nothing: logaddexp(lse, -inf) == lse
                v_rows, unpg_stats = self._unpg_term(self.unpg, local_x, global_x, global_labels, sizes)
                stats.update(unpg_stats)
                denominator = torch.logaddexp(lse, v_rows)
            loss = (denominator - target).mean()
            extra = self.margin.extra_loss(global_x)
            if extra is not None:
                # replicated on every rank: each contributes 1/R of its gradient
                loss = loss + scale_grad(extra, 1.0 / self.world_size)
        stats["loss"] = loss.detach()
        self.last_stats = stats
        # copies: the buffers move on at the next step, the loop may read several steps at once
        self._margin_stats = {f"margin/{k}": v.detach().clone() for k, v in self.margin.stats().items()}
        return loss

    # ----------------------------------------------------------- the Head protocol
    def stats(self) -> Dict[str, torch.Tensor]:
        """After the last forward, by TensorBoard tag (see :mod:`trainer.heads.protocol`):
        ``head/loss``; with UNPG ``unpg/neg_pairs``, ``unpg/kept``, ``unpg/kept_fraction``,
        ``unpg/lower``, ``unpg/upper``, ``unpg/mean_pos_sim``, ``unpg/mean_neg_sim`` and the
        histogram sample ``unpg/neg_sims``; ``margin/<name>`` for an adaptive margin's running
        state. Detached device tensors (no host sync here)."""
        st = self.last_stats
        out: Dict[str, torch.Tensor] = {}
        loss = st.get("loss")
        if isinstance(loss, torch.Tensor):
            out["head/loss"] = loss
        if self.unpg is not None:
            out.update({f"unpg/{k}": v for k, v in st.items()
                        if k not in ("loss", "batch") and isinstance(v, torch.Tensor)})
        for k, v in self.step_stats().items():
            out[k if "/" in k else f"unpg/{k}"] = v
        return out

    def step_stats(self) -> Dict[str, torch.Tensor]:
        """Recorded for every step (the run's history, under these names): with UNPG
        ``kept_fraction`` = kept / negative pairs (NaN without a pair), and the margin's
        running state ``margin/<name>``."""
        out = dict(self._margin_stats)
        st = self.last_stats
        kept, pairs = st.get("kept"), st.get("neg_pairs")
        if self.unpg is not None and isinstance(kept, torch.Tensor) and isinstance(pairs, torch.Tensor):
            out["kept_fraction"] = kept / pairs  # 0/0 = NaN: no pair this step
        return out

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "weight")
        if isinstance(saved, torch.Tensor) and saved.dtype != self.weight.dtype:
            log.warning("class centres and momentum stored as %s, this run keeps them as %s (loss.state_dtype): "
                        "converted on load%s", saved.dtype, self.weight.dtype,
                        " (rounded to nearest)" if self.weight.element_size() < saved.dtype.itemsize else " (exact)")
        load = cast(Callable[..., None], super()._load_from_state_dict)  # pyright: ignore[reportUnknownMemberType]
        load(state_dict, prefix, *args, **kwargs)

    def _unpg_term(self, unpg: UNPG, local_x: torch.Tensor, global_x: torch.Tensor, global_labels: torch.Tensor,
                   sizes: List[int]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Per global row, V of its row's pairs ([N]; -inf where there is no negative pair)."""
        s, wisk = self.margin.s, unpg.wisk
        if unpg.use_sharded(self.world_size):
            # Each rank evaluates only the pairs it owns: no 1/R scaling, the gather's backward sums.
            elements = self.chunk_elements or (1 << 26 if global_x.is_cuda else 1 << 21)
            v, stats = sharded_metric_negatives_lse(
                F.normalize(global_x, dim=1), global_labels, sizes, s, wisk, self.process_group, elements
            )
            return v.expand(global_x.shape[0]), stats
        if unpg.negatives == "global":
            v, stats = metric_negatives_lse(F.normalize(global_x, dim=1), global_labels, s, wisk)
            # Replicated on every rank: each contributes 1/R of its gradient (collectives.py).
            return scale_grad(v, 1.0 / self.world_size).expand(global_x.shape[0]), stats
        # "local": row i uses V of its own rank, computed from that rank's batch.
        start = sum(sizes[: self.rank])
        local_labels = global_labels[start : start + sizes[self.rank]]
        v, stats = metric_negatives_lse(F.normalize(local_x, dim=1), local_labels, s, wisk)
        if self.world_size == 1:
            return v.expand(global_x.shape[0]), stats
        all_v = all_gather_rows(v.detach().reshape(1), [1] * self.world_size, self.process_group)
        # Own rows carry the live V (gradient to this rank's batch); others are constants.
        pieces = [
            (v if r == self.rank else all_v[r]).reshape(1).expand(n) for r, n in enumerate(sizes)
        ]
        return torch.cat(pieces), stats
