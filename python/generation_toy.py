"""A generation job end to end without the hub: an E2E-shaped table-to-text set and tiny random models.

    python python/generation_toy.py toy/          # toy/{train,dev}.jsonl, toy/llama, toy/bart
    ptv2 train --task custom --train-file toy/train.jsonl --dev-file toy/dev.jsonl --model toy/llama \\
        --max-length 48 --max-new-tokens 16 --prefix-len 8 --lr 5e-2 --epochs 5
    ptv2 predict --run runs/custom-prefix --input toy/dev.jsonl --output generations.jsonl

Rows are E2E's meaning representations reduced to four attributes (``name[...] food[...] area[...]
price[...]``) and one templated reference each: 504 combinations, 60 held out for dev. The backbones
are random (a 4-layer LLaMA of width 64 and the 2+1-layer BART of ``hf/arch.py``), with word-level
tokenizers of the set's words: a frozen random backbone lets a prefix learn the template but not copy
the values, fine-tuning learns both. With a real decoder (GPT-2, LLaMA, Qwen) or BART/T5 from the hub
the same commands run Li and Liang's experiments on the real E2E, WebNLG, DART or XSum files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

NAMES = ["Alimentum", "Aromi", "Bibimbap", "Clowns", "Cotto", "Giraffe", "Loch", "Midsummer", "Strada", "Vaults",
         "Wildwood", "Zizzi"]
FOODS = ["Chinese", "English", "French", "Indian", "Italian", "Japanese", "fast food"]
AREAS = ["city centre", "riverside"]
PRICES = ["cheap", "moderate", "high"]
DEV_ROWS = 60
MODELS = {"llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4), "bart": {}}


def rows() -> list:
    out = [{"source": f"name[{n}] food[{f}] area[{a}] price[{p}]", "target": f"{n} is a {p} {f} restaurant in the {a} ."}
           for n, f, a, p in itertools.product(NAMES, FOODS, AREAS, PRICES)]
    random.Random(0).shuffle(out)
    return out


def main(argv=None) -> None:
    from ptv2_kernels.hf.testing import tiny_generation_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="where the data and the models are written")
    folder = ap.parse_args(argv).folder
    folder.mkdir(parents=True, exist_ok=True)
    data = rows()
    for name, part in (("dev", data[:DEV_ROWS]), ("train", data[DEV_ROWS:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    texts = [r["source"] + " " + r["target"] for r in data]
    for model_type, size in MODELS.items():
        tiny_generation_model(folder / model_type, model_type, texts, **size)
    print(f"{folder}: train.jsonl ({len(data) - DEV_ROWS} rows), dev.jsonl ({DEV_ROWS}), "
          + ", ".join(MODELS) + " (tiny random models with their tokenizers)")


if __name__ == "__main__":
    main()
