"""Fourier features of a coordinate in [0, 1]: one smooth code shared by image and text.

The tiny model built in code uses the same code twice: the vision warm-up teaches the tower to
carry each lesion's box edges as these features, and the number tokens of the 0-100 box grid
start with their value's features as embedding and output rows. Reading a box out of the image
is then a linear copy (attend to the lesion, move its edge code into the residual stream, score
it against the number rows), instead of a lookup table learned from scratch per number.
"""

from __future__ import annotations

import math

import torch

# periods 2, 1, 1/2, ... 1/16 of the image side: coarse terms disambiguate, fine ones sharpen
N_FREQ = 6


def fourier(u: torch.Tensor, n_freq: int = N_FREQ) -> torch.Tensor:
    """(..., ) in [0, 1] -> (..., 2 * n_freq): sin/cos of 2*pi*u/period for halving periods."""
    freqs = math.pi * (2.0 ** torch.arange(n_freq, dtype=torch.float32, device=u.device))
    ang = u.float().unsqueeze(-1) * freqs
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


@torch.no_grad()
def init_number_rows(
    model, tokenizer, grid: int = 100, scale_in: float = 0.1, scale_out: float = 0.3, seed: int = 0
) -> int:
    """Give the number tokens "0".."grid" their value's Fourier code, in a random subspace.

    Returns how many rows were set (tokens missing from the vocabulary are left alone).
    """
    ids, vals = [], []
    for v in range(grid + 1):
        i = tokenizer.convert_tokens_to_ids(str(v))
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.append(i), vals.append(v / grid)
    if not ids:
        return 0
    emb_in, emb_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    code = fourier(torch.tensor(vals))  # (n, 2F)
    for w, scale in ((emb_in, scale_in), (emb_out, scale_out)):
        basis, _ = torch.linalg.qr(torch.randn(w.shape[1], code.shape[1], generator=g))  # (hidden, 2F) orthonormal
        w[ids] += (scale * code @ basis.T).to(w.dtype)
    return len(ids)
