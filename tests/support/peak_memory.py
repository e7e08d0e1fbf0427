"""Measure the extra peak memory of K-FAC steps over plain steps, in a fresh process.

Method (Linux): the process's peak resident set (``VmHWM`` in /proc/self/status) is reset by
writing "5" to /proc/self/clear_refs and read back, around forward/backward and around the rest
of the step, for the same steps (model, batches, optimizer with lr 0) without and with K-FAC.
K-FAC's peak is the largest of: its forward/backward peak minus the plain one, and its
``pre.step`` + ``opt.step`` peak minus what the plain run holds after its backward (the model's
activations are gone by then, so this is K-FAC's own memory, not hidden behind theirs). The child
runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every tensor above 64 KiB with its own
mapping and returns it to the system when freed, so resident memory follows the live tensors (with
glibc's default, adaptive threshold, freed blocks up to 32 MiB stay in the heap and are reused
without showing in the peak). A warm-up run first pages in the LAPACK code, so that its one-off cost
is not counted.

Usage: ``measure(spec)`` returns ``{"plain": bytes, "kfac": bytes, "extra": bytes,
"predicted": bytes, "structures": ..., "cpu_plain": s, "cpu_first": s}``; ``spec`` is a dict
with ``model`` ("head" for ``Linear(d_in, d_out)`` on (batch, d_in) inputs, "llama" for a
transformers Llama), ``options`` (KFACConfig keywords) and sizes.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]

_CHILD = r'''
import gc, json, sys, time
import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
spec = json.loads(sys.argv[1])


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build():
    torch.manual_seed(0)
    if spec["model"] == "head":
        model = nn.Linear(spec["d_in"], spec["d_out"], bias=spec.get("bias", False))
        data = [(torch.randn(spec["batch"], spec["d_in"]),
                 torch.randint(0, spec["d_out"], (spec["batch"],))) for _ in range(spec["steps"])]
        def loss_fn(m, x, y):
            return F.cross_entropy(m(x), y)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
        model = LlamaForCausalLM(cfg)
        model.train()
        data = [(torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"])), None)
                for _ in range(spec["steps"])]
        def loss_fn(m, x, y):
            return m(input_ids=x, labels=x).loss
    return model, data, loss_fn


def run(model, data, loss_fn, pre, opt, trace=None):
    """Train on ``data``; with ``trace``, append per step the peak resident bytes of
    forward/backward and of the rest of the step (pre.step + opt.step) and the resident bytes
    between the two."""
    times = []
    for x, y in data:
        start = time.process_time()
        if trace is not None:
            gc.collect()
            reset_peak()
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, y).backward()
        if trace is not None:
            fb_peak, after_bwd = status("VmHWM"), status("VmRSS")
            reset_peak()
        if pre is not None:
            pre.step(opt)
        opt.step()
        times.append(time.process_time() - start)
        if trace is not None:
            trace.append((fb_peak, after_bwd, status("VmHWM")))
    return times


def measured(model, data, loss_fn, pre, opt):
    gc.collect()
    base = status("VmRSS")
    trace = []
    times = run(model, data, loss_fn, pre, opt, trace)
    return [[v - base for v in row] for row in trace], times


from lightning_kfac import KFACPreconditioner
from lightning_kfac.core.footprint import footprint

# warm-up: page in autograd, LAPACK and the engine's code paths once
warm = nn.Sequential(nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 10))
wopt = torch.optim.SGD(warm.parameters(), lr=0.0)
for method in ("eigen", "inverse", "ekfac"):
    wpre = KFACPreconditioner(warm, compute_method=method, factor_update_steps=1,
                              inv_update_steps=1)
    run(warm, [(torch.randn(8, 300), torch.randint(0, 10, (8,)))] * 2,
        lambda m, x, y: F.cross_entropy(m(x), y), wpre, wopt)
    wpre.remove()
del warm, wopt, wpre

model, data, loss_fn = build()
opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every run sees the same weights
run(model, data[:1], loss_fn, None, opt)
plain, plain_times = measured(model, data, loss_fn, None, opt)
pre = KFACPreconditioner(model, **spec.get("options", {}))
kfac, kfac_times = measured(model, data, loss_fn, pre, opt)
# what K-FAC adds at each point of a step, at its largest: forward/backward peak against the plain
# one, and the rest of the step's peak against what the plain run holds after its backward
extra = max(max(k[0] - p[0], k[2] - p[1]) for k, p in zip(kfac, plain))
print("RESULT" + json.dumps({
    "plain": max(max(p[0], p[2]) for p in plain), "kfac": max(max(k[0], k[2]) for k in kfac),
    "extra": extra, "predicted": footprint(pre.blocks.values()).peak,
    "structures": {n: [b.a_structure.name, b.g_structure.name] for n, b in pre.blocks.items()},
    "cpu_plain": sorted(plain_times)[len(plain_times) // 2], "cpu_first": kfac_times[0],
    "cpu_kfac": sorted(kfac_times[1:] or kfac_times)[len(kfac_times[1:] or kfac_times) // 2],
}))
'''


def measure(spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"measurement child failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])
