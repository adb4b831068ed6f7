"""Shared by the demo's processes: the data split and the model."""
import numpy as np

EMBED_DIM = 128
HELDOUT_FRACTION = 0.2


def split(n, seed=0):
    """Deterministic train / held-out split of sample ids 0..n-1."""
    order = np.random.default_rng(seed).permutation(n)
    n_heldout = int(round(n * HELDOUT_FRACTION))
    return np.sort(order[n_heldout:]), np.sort(order[:n_heldout])


def make_model():
    """A small CNN for 8x8 digits; `embed` is the penultimate layer (its output is saved)."""
    import torch
    from torch import nn

    class DigitsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
            self.embed = nn.Sequential(nn.Linear(64 * 4 * 4, EMBED_DIM), nn.ReLU())
            self.head = nn.Linear(EMBED_DIM, 10)

        def forward(self, x):
            return self.head(self.embed(self.features(x)))

    torch.manual_seed(0)
    return DigitsNet()
