"""Standalone ``strategy="ddp"`` run (2 CPU ranks, gloo) for
tests/integrations/lightning/test_distributed_lightning.py.

Lightning's "ddp" launcher re-runs this script for rank 1, so it cannot run inside pytest
(Lightning 2.x behaviour).
Usage: ``python tests/ddp_scripts/lightning_ddp.py OUT_DIR STEPS [NODES]``;
each rank writes ``OUT_DIR/rank{r}.pt`` (params, factors, K-FAC state) at ``on_fit_end``. With
NODES=2 the script is one "node" of 1 device: start it twice with ``NODE_RANK=0`` / ``1`` and the
same ``MASTER_ADDR`` / ``MASTER_PORT`` (what a multi-node launch does, on one machine).
The repository root must be on ``PYTHONPATH`` (the test sets it; Lightning's launcher passes the
environment on to rank 1), so that ``tests.*`` and ``lightning_kfac`` import.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lightning_kfac.integrations.lightning.callback import KFACCallback
from tests.integrations.lightning.test_distributed_lightning import (
    BATCH,
    OPTIONS,
    N,
    RankDump,
    rank_loader,
)
from tests.support.lightning import MLP, make_dataset, make_trainer


def main(out_dir: str, steps: int, nodes: int = 1) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    trainer = make_trainer(
        out,
        strategy="ddp",
        devices=2 // nodes,
        num_nodes=nodes,
        max_steps=steps,
        use_distributed_sampler=False,
        callbacks=[KFACCallback(**OPTIONS), RankDump(out)],
    )
    trainer.fit(MLP(), rank_loader(make_dataset(N), BATCH))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
