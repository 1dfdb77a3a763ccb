"""Measured exactness of the prefix forms and the decomposition on the three model families.

    python benchmarks/exactness.py            # prints a Markdown table (max |Δ|)

Rows: a prefix from a real prompt vs the real prompt (logits at content positions), each
residual/soft prefix vs its ``to_kv()``, and the decomposition identities with P = 1 and P = 4.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

# this checkout's prefixlens, even where another copy is installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prefixlens as pl  # noqa: E402
from prefixlens import models
from prefixlens.environment import describe

warnings.filterwarnings("ignore")

FAMILIES = {
    "toy_gpt2": lambda dtype: models.toy_gpt2(n_layers=2, d_model=64, n_heads=4, d_vocab=101, init_range=0.3, seed=0, dtype=dtype),
    "toy_llama (GQA 4q/2kv)": lambda dtype: models.toy_llama(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_vocab=101, init_range=0.3, seed=0, dtype=dtype),
    "native": lambda dtype: models.native(n_layers=2, d_model=64, n_heads=4, d_vocab=101, init_range=0.3, seed=0, dtype=dtype),
}


@torch.no_grad()
def measure(model, batch: int = 4, P: int = 4, T: int = 12) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    prompt, x = torch.randint(3, 101, (P,), generator=g), torch.randint(3, 101, (batch, T), generator=g)
    real = model(torch.cat([prompt.expand(batch, -1), x], dim=1))[:, P:]
    row = {}
    for form in (pl.KVPrefix, pl.ResidualPrefix, pl.SoftPrompt):
        prefix = form.from_prompt(model, prompt)
        row[f"{form.__name__}.from_prompt vs prompt"] = (pl.run_with_prefix(model, x, prefix) - real).abs().max().item()
        if form is not pl.KVPrefix:
            random = form.random(model, P, seed=1)
            row[f"{form.__name__} vs to_kv()"] = (
                pl.run_with_prefix(model, x, random) - pl.run_with_prefix(model, x, random.to_kv(model))
            ).abs().max().item()
    for n_slots in (1, P):
        d = pl.decompose(model, x, pl.ResidualPrefix.random(model, n_slots, seed=2))
        row[f"decomposition z, P={n_slots}"] = d.reconstruction_error()
        row[f"decomposition via W_O, P={n_slots}"] = float(d.residual_reconstruction_error().max())
        row[f"relative attention, P={n_slots}"] = float(d.relative_attention_error().max())
    return row


def main(argv=None) -> str:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    columns, table = [], {}
    for name, build in FAMILIES.items():
        for dtype in (torch.float32, torch.float64):
            col = f"{name} {str(dtype).removeprefix('torch.')}"
            columns.append(col)
            for check, err in measure(build(dtype)).items():
                table.setdefault(check, {})[col] = err
    lines = ["| check (max abs error) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {check} | " + " | ".join(f"{row[c]:.1e}" for c in columns) + " |" for check, row in table.items()]
    text = "\n".join(lines + ["", f"Environment: {describe()}."])
    print(text)
    return text


if __name__ == "__main__":
    main()
