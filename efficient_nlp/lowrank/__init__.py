"""Low-rank factorisation: truncated SVD of Linears (plain, Fisher-weighted, activation-aware),
ALBERT's factorised embedding, global rank budgets, and save / reload (docs/lowrank.md).

    from efficient_nlp import lowrank
    small, report = lowrank.factorize(model, rank=64)              # every q k v o ffn site
    print(report)                                                  # ranks, parameters, energy kept
    small, info = lowrank.factorize_embedding(small, 128)          # V x 128 then 128 x H
    lowrank.save(small, "out/"); again = lowrank.load("out/")

`svd` holds the pure functions (`svd.truncated`, `svd.rank_for_energy`, `svd.choose_ranks`,
`svd.break_even_rank`); `LowRankLinear` / `FactorizedEmbed` are made of plain ``nnx.Linear`` /
``nnx.Embed``, so quantization and the other transforms compose with them.
"""
from efficient_nlp.lowrank import svd
from efficient_nlp.lowrank.io import LAYOUT_NAME, layout, load, restructure, save
from efficient_nlp.lowrank.modules import FactorizedEmbed, LowRankLinear
from efficient_nlp.lowrank.svd import break_even_rank, choose_ranks, rank_for_energy
from efficient_nlp.lowrank.transform import (
    METHODS,
    LowRankReport,
    Row,
    factorize,
    factorize_embedding,
    fisher,
    input_scales,
    spectra,
)

__all__ = ["FactorizedEmbed", "LAYOUT_NAME", "LowRankLinear", "LowRankReport", "METHODS", "Row", "break_even_rank",
           "choose_ranks", "factorize", "factorize_embedding", "fisher", "input_scales", "layout", "load",
           "rank_for_energy", "restructure", "save", "spectra", "svd"]
