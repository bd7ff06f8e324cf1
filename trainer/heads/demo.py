"""A few distributed steps of the head on synthetic embeddings.

    torchrun --nproc_per_node=2 -m trainer.heads.demo      # or plain `python -m trainer.heads.demo`

A linear "backbone" maps noisy class prototypes to embeddings; Partial FC +
UNPG trains it and the shard. Prints the loss and UNPG statistics per step.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from trainer.heads import UNPG, ArcFace, PartialFC, PartialFCSGD


# torch's unannotated calls this demo makes, through one typed door each
def _manual_seed(seed: int) -> None:
    torch.manual_seed(seed)  # pyright: ignore[reportUnknownMemberType]


def _step(opt: torch.optim.Optimizer) -> None:
    opt.step()  # torch.optim.SGD's own step is partly unannotated; the base class's is typed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128, help="per-rank batch")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sample-rate", type=float, default=0.3)
    ap.add_argument("--wisk", type=float, default=1.5)
    args = ap.parse_args()

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    )
    _manual_seed(0)  # same prototypes and backbone init everywhere
    dim_in, dim = 64, 128
    prototypes = torch.randn(args.classes, dim_in, device=device)
    backbone = torch.nn.Linear(dim_in, dim).to(device)
    if world > 1:
        backbone = torch.nn.parallel.DistributedDataParallel(backbone)
    _manual_seed(1 + rank)
    head = PartialFC(ArcFace(s=64.0, m=0.5), dim, args.classes, sample_rate=args.sample_rate,
                     unpg=UNPG(wisk=args.wisk)).to(device)
    opt_head = PartialFCSGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_bb = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    if rank == 0:
        print(f"world {world}, classes {args.classes} (rank 0 holds {head.class_range}), "
              f"global batch {args.batch * world}, sample rate {args.sample_rate}, UNPG wisk {args.wisk}")
    for step in range(1, args.steps + 1):
        labels = torch.randint(0, args.classes, (args.batch,), device=device)
        x = prototypes[labels] + 0.5 * torch.randn(args.batch, dim_in, device=device)
        emb = backbone(x)
        # The head's gradient is that of the global-mean loss; DDP averages over ranks: undo it.
        def undo_mean(g: torch.Tensor) -> torch.Tensor:
            return g * world

        emb.register_hook(undo_mean)
        loss = head(emb, labels)
        opt_head.zero_grad()
        opt_bb.zero_grad()
        loss.backward()
        opt_head.step()
        _step(opt_bb)
        if rank == 0 and (step == 1 or step % 5 == 0):
            st = {k: float(v) for k, v in head.stats().items() if v.dim() == 0}  # the one host sync
            print(f"step {step:3d} loss {st['head/loss']:8.3f} | neg pairs {st['unpg/neg_pairs']:.0f} "
                  f"kept {st['unpg/kept']:.0f} bounds [{st['unpg/lower']:+.3f}, {st['unpg/upper']:+.3f}] "
                  f"mean s_p {st['unpg/mean_pos_sim']:+.3f} s_n {st['unpg/mean_neg_sim']:+.3f}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
