"""Decompositions of factors with exactly-zero rows/columns, and counted + logged float64 retries.

A conv whose kernel taps read only zero padding (3x3 conv on a 1x1 map: 8 of 9 taps) has an
input factor A with exactly-zero rows and columns. ``linalg`` deflates them (e_j is an exact
eigenvector, eigenvalue 0) and decomposes only the support block; checked here against dense
float64 references: the eigendecomposition rebuilds A, the damped inverse equals the dense one,
and the preconditioned gradient of both methods equals the dense solve, also when the gradient
is nonzero on the zero columns. A float32 failure retried in float64 is counted in
``counters["decomposition_retries"]`` and logged with the layer name; a slow refresh logs
progress (layer, time).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.core import linalg
from lightning_kfac.core.factors import DenseFactor
from lightning_kfac.core.refresh import logger
from tests.support import dense as D

DT = torch.float64


def _psd_with_zero_rows(
    n: int, zero: list[int], rank: int, seed: int, diagonal: float = 0.0
) -> Tensor:
    """Rows/columns ``zero`` are zero, or zero off the diagonal with ``diagonal`` there (an
    identity-blended factor)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(rank, n, generator=gen, dtype=DT)
    rows[:, zero] = 0.0
    M = rows.T @ rows / rank
    M[zero, zero] = diagonal
    return M


def test_deflated_eigh_is_an_exact_eigendecomposition() -> None:
    zero = [0, 3, 4, 9]
    A = _psd_with_zero_rows(10, zero, rank=4, seed=0)  # rank-deficient support too
    out = linalg.eigh_psd(A)
    Q, e = out["Q"], out["e"]
    assert out["support"].tolist() == [i for i in range(10) if i not in zero]
    assert torch.allclose(Q @ torch.diag(e) @ Q.T, A, atol=1e-13)
    assert torch.allclose(Q.T @ Q, torch.eye(10, dtype=DT), atol=1e-13)
    assert bool((e >= 0).all())
    assert torch.equal(e[:4], torch.zeros(4, dtype=DT))  # exactly zero, not round-off
    assert torch.allclose(e.sort().values, torch.linalg.eigvalsh(A).clamp_min(0), atol=1e-13)
    blended = _psd_with_zero_rows(10, zero, rank=4, seed=0, diagonal=0.7)
    out = linalg.eigh_psd(blended)
    assert out["support"].numel() == 6 and torch.equal(
        out["e"][:4], torch.full((4,), 0.7, dtype=DT)
    )
    assert torch.allclose(out["Q"] @ torch.diag(out["e"]) @ out["Q"].T, blended, atol=1e-13)
    assert "support" not in linalg.eigh_psd(_psd_with_zero_rows(6, [], rank=8, seed=1))


def test_deflated_damped_inverse_equals_the_dense_inverse() -> None:
    for diagonal in (0.0, 0.4):
        A = _psd_with_zero_rows(9, [1, 2, 7], rank=12, seed=2, diagonal=diagonal)
        inv = linalg.damped_inverse(A, 0.3)
        ref = torch.linalg.inv(A + 0.3 * torch.eye(9, dtype=DT))
        assert torch.allclose(inv, ref, atol=1e-12)


@pytest.mark.parametrize("diagonal", [0.0, 0.3], ids=["zero", "identity-blend"])
@pytest.mark.parametrize("zero", [[0, 2, 5, 6], [3]], ids=["support-block", "dense-Q"])
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_deflated_preconditioning_equals_the_dense_solve(
    method: str, zero: list[int], diagonal: float
) -> None:
    """Half of A decoupled: the support-block path; one such row: the dense Q_A / A_inv path."""
    A = _psd_with_zero_rows(8, zero, rank=3, seed=3, diagonal=diagonal)
    pays = len(zero) >= 4
    G = _psd_with_zero_rows(4, [], rank=6, seed=4)
    grad = torch.randn(4, 8, generator=torch.Generator().manual_seed(5), dtype=DT)  # Z too
    damping = 0.05
    sa, sg = DenseFactor(8), DenseFactor(4)
    if method == "eigen":
        dec = linalg.eigen_decomposition(A, G, sa, sg)
        assert ("A_support_Q" in dec) == pays
        got = linalg.precondition_eigen(grad, dec, damping, sa, sg)
        ref = D.eigen_precondition(A, G, grad, damping)
    else:
        dec = linalg.inverse_decomposition(A, G, damping, sa, sg)
        assert ("A_support_inv" in dec) == pays
        got = linalg.precondition_inverse(grad, dec, sa, sg)
        ref = D.inverse_precondition(A, G, grad, damping)
    assert D.rel_err(got, ref) < 1e-12


def _one_pixel_net() -> nn.Module:
    """A 3x3 conv (padding 1) on a 1x1 map, as in a ResNet's last stage on 32x32 inputs."""
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_engine_on_padding_only_taps_equals_dense_reference(method: str) -> None:
    torch.manual_seed(6)
    model = _one_pixel_net().to(DT)
    x, y = torch.randn(7, 4, 1, 1, dtype=DT), torch.randint(0, 3, (7,))
    pre = KFACPreconditioner(model, compute_method=method, damping=1e-2, kl_clip=None)
    with D.record(model, ["0", "2"]) as store:
        F.cross_entropy(model(x), y).backward()
    raw = {n: D.grad_matrix(dict(model.named_modules())[n]) for n in ("0", "2")}
    pre.step()
    factors = D.brute_factors(model, store)
    for name in ("0", "2"):
        A, G = factors[name]
        dec = pre.blocks[name].decomposition
        # only the centre tap (index 4 of 9 per channel) and the bias see data
        support = [c * 9 + 4 for c in range(A.shape[0] // 9)] + [A.shape[0] - 1]
        assert dec["A_support"].tolist() == support
        ref = (D.eigen_precondition if method == "eigen" else D.inverse_precondition)(
            A, G, raw[name], 1e-2
        )
        assert D.rel_err(D.grad_matrix(dict(model.named_modules())[name]), ref) < 1e-10


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def kfac_log():
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_float64_retries_are_counted_and_logged(monkeypatch, kfac_log) -> None:
    """Every float32 eigh fails: each retry is counted and logged with the layer's name."""
    real = torch.linalg.eigh

    def failing_in_float32(m, *args, **kwargs):
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("injected: failed to converge")
        return real(m, *args, **kwargs)

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=2)
    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    for _ in range(3):  # refreshes at t = 0 and t = 2: 2 layers x (A, G) x 2 refreshes
        model.zero_grad()
        F.cross_entropy(model(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
        pre.step()
    assert pre.counters["decomposition_retries"] == 8
    assert pre.counters["decomposition_failures"] == 0
    retry_lines = [m for m in kfac_log if "retrying in float64" in m]
    assert len(retry_lines) == 8
    assert sum("layer '0'" in m for m in retry_lines) == 4
    assert "injected: failed to converge" in retry_lines[0]
    assert pre.state_dict()["counters"]["decomposition_retries"] == 8


def test_no_retry_on_a_padding_dominated_float32_factor(kfac_log) -> None:
    """A 4608-wide float32 factor with 4096 zero rows (ResNet-18's last stage on 32x32 inputs):
    decomposed through its 512-wide support, no retry, exact."""
    gen = torch.Generator().manual_seed(8)
    rows = torch.zeros(64, 4608)
    rows[:, 4::9] = torch.randn(64, 512, generator=gen)
    A = rows.T @ rows / 64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = linalg.eigh_psd(A)
    assert not [w for w in caught if issubclass(w.category, linalg.DecompositionRetryWarning)]
    assert out["support"].numel() == 512
    sub = A[4::9][:, 4::9].double()
    rebuilt = (out["Q"] @ torch.diag(out["e"]) @ out["Q"].T).double()
    assert float((rebuilt - A.double()).abs().max()) <= 1e-5 * float(sub.abs().max())


def test_slow_refresh_reports_progress(kfac_log) -> None:
    """With report_after = 0 every layer of the refresh is logged with its time, then the total."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    pre = KFACPreconditioner(model)
    pre.refresh.report_after = 0.0
    F.cross_entropy(model(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
    pre.step()
    progress = [m for m in kfac_log if "took" in m]
    assert [m.split("layer ")[1].split(" ")[0] for m in progress] == ["1/2", "2/2"]
    assert "0 (A 6, G 4)" in progress[0] and "2 (A 5, G 3)" in progress[1]
    assert any("2 layers decomposed in" in m for m in kfac_log)
    assert set(pre.refresh.layer_seconds) == {"0", "2"}


@pytest.mark.parametrize("method", ["eigen", "inverse", "ekfac"])
def test_deflated_decomposition_survives_a_state_round_trip(method: str) -> None:
    """The support indices stay integer through state_dict / load_state_dict (float32 model),
    and the resumed preconditioner continues bit-identically."""
    torch.manual_seed(10)
    model = _one_pixel_net()
    x, y = torch.randn(7, 4, 1, 1), torch.randint(0, 3, (7,))
    pre = KFACPreconditioner(
        model, compute_method=method, factor_update_steps=1, inv_update_steps=2
    )
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert pre.blocks["2"].decomposition["A_support"].dtype == torch.int64
    state = pre.state_dict()
    pre.remove()
    twin = KFACPreconditioner(
        model, compute_method=method, factor_update_steps=1, inv_update_steps=2
    )
    twin.load_state_dict(state)
    assert twin.blocks["2"].decomposition["A_support"].dtype == torch.int64
    grads = []
    for engine in (twin, pre):
        if engine is pre:
            twin.remove()
            pre.capture.install()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        engine.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
