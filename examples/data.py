"""scikit-learn's handwritten digits as a LightningDataModule (nothing is downloaded).

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-scale digits (pixel values 0..16)
with scikit-learn. Here pixels are scaled to [0, 1] (``x / 16``), the images are split once into a
stratified train/test split with a fixed seed, held in memory as tensors, and served by
DataLoaders whose shuffling uses a fixed-seed generator, so two runs with the same config see the
same batches in the same order (the K-FAC-vs-baseline comparison relies on it).

Batches are ``(x, y)`` with ``x`` of shape ``(B, 64)`` (flattened; the CNN reshapes to 1x8x8) and
``y`` the digit labels (long).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

NUM_PIXELS = 64
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


def load_digits_tensors(
    test_fraction: float = 0.2, split_seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)``: float32 pixels in [0, 1], long labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid test_fraction={test_fraction!r}: must be a number in (0, 1).")
    digits = load_digits()
    x = digits.data.astype("float32") / 16.0
    y = digits.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    return (
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
    )


class DigitsDataModule(pl.LightningDataModule):
    """The digits, in memory, with a fixed split and a seeded shuffle.

    Args:
        batch_size: examples per training step (the test split is served as one batch).
        test_fraction: share of the images held out for ``trainer.test`` (stratified by digit).
        split_seed: seed of the train/test split.
        loader_seed: seed of the training DataLoader's shuffling generator.
        train_size: keep only the first ``train_size`` training images (None keeps all).
        num_workers: DataLoader worker processes (0: the data is tiny and in memory).

    Example:
        >>> dm = DigitsDataModule(batch_size=32); dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader())); x.shape
        torch.Size([32, 64])
    """

    def __init__(
        self,
        batch_size: int = 100,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        loader_seed: int = 0,
        train_size: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Invalid batch_size={batch_size!r}: must be an integer >= 1.")
        if train_size is not None and (not isinstance(train_size, int) or train_size < 1):
            raise ValueError(f"Invalid train_size={train_size!r}: must be None or an integer >= 1.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.loader_seed = loader_seed
        self.train_size = train_size
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x_tr, y_tr, x_te, y_te = load_digits_tensors(self.test_fraction, self.split_seed)
        if self.train_size is not None:
            x_tr, y_tr = x_tr[: self.train_size], y_tr[: self.train_size]
        self.train_set = TensorDataset(x_tr, y_tr)
        self.test_set = TensorDataset(x_te, y_te)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.loader_seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader:
        return DataLoader(
            self.test_set,
            batch_size=len(self.test_set),
            shuffle=False,
            num_workers=self.num_workers,
        )
