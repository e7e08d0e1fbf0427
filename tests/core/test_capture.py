"""The one capture hook (core/capture.py): the rows a tap receives are the layer's ``a`` and,
scaled by ``output_grad_scale``, the per-example ``g_n = dl_n/ds_n`` of a float64 brute force."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_kfac.core.capture import install_tap, output_grad_scale
from lightning_kfac.core.layers import make_kind


class _Recorder:
    """A tap keeping every forward's input rows and output-gradient rows."""

    def __init__(self, kind, want: bool = True):
        self.kind, self.want = kind, want
        self.a: list[tuple[Tensor, int]] = []
        self.g: list[tuple[Tensor, int, int]] = []

    def wants(self, module: nn.Module) -> bool:
        return self.want

    def on_forward(
        self, x: Tensor, rows: Tensor, divisor: int, output: Tensor
    ) -> Callable[[Tensor], None] | None:
        self.a.append((rows, divisor))
        return lambda grad: self.g.append(self.kind.grad_rows(grad))


def _setup(want: bool = True):
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    kind, _ = make_kind(layer)
    tap = _Recorder(kind, want)
    handle = install_tap(layer, kind, tap)
    return layer, tap, handle


def test_tap_rows_are_a_and_per_example_g_of_a_brute_force() -> None:
    layer, tap, handle = _setup()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randn(7, 3, dtype=torch.float64)
    loss = (layer(x) - y).pow(2).sum(1).mean()  # mean over N = 7 examples
    loss.backward()
    handle.remove()
    ((rows, divisor),) = tap.a
    assert divisor == 7
    torch.testing.assert_close(
        rows, torch.cat([x, torch.ones(7, 1, dtype=x.dtype)], 1), rtol=0, atol=0
    )
    ((g_rows, g_div, examples),) = tap.g
    assert (g_div, examples) == (7, 7)
    # brute force: l_n = |W x_n + b - y_n|^2, so g_n = dl_n/ds_n = 2 (s_n - y_n)
    with torch.no_grad():
        expected = 2.0 * (layer(x) - y)
    scale = output_grad_scale(examples, mean_reduction=True)
    torch.testing.assert_close(g_rows * scale, expected, rtol=1e-12, atol=1e-12)


def test_tap_that_declines_gets_nothing_and_removed_hook_is_gone() -> None:
    layer, tap, handle = _setup(want=False)
    layer(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    assert tap.a == [] and tap.g == []
    handle.remove()
    tap.want = True
    layer(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    assert tap.a == [] and tap.g == []


def test_torch_func_passes_are_not_captured() -> None:
    layer, tap, handle = _setup()
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.func.vmap(lambda row: layer(row))(x)
    assert tap.a == []
    layer(x)
    handle.remove()
    assert len(tap.a) == 1


@pytest.mark.parametrize(
    "mean, grad_scale, expected",
    [(True, 1.0, 8.0), (True, 4.0, 2.0), (False, 1.0, 1.0), (False, 0.5, 2.0)],
)
def test_output_grad_scale_undoes_mean_and_loss_scale(mean, grad_scale, expected) -> None:
    assert output_grad_scale(8, mean_reduction=mean, grad_scale=grad_scale) == expected


def test_output_grad_scale_of_a_summed_sampled_loss() -> None:
    assert output_grad_scale(8, mean_reduction=True, per_example=True) == 1.0
    assert output_grad_scale(8, mean_reduction=True, per_example=True, loss_terms=8) == 1.0
    # a loss averaged over 32 terms (4 per example): g scaled as the user's gradient would be
    assert output_grad_scale(8, mean_reduction=True, per_example=True, loss_terms=32) == 0.25
