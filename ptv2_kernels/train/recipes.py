"""The authors' published P-Tuning v2 hyperparameters (THUDM/P-tuning-v2 ``run_script/*.sh``, as
collected in the project's RECIPES.md), one recipe per task and backbone; and the project's own recipe
for the packaged MiniLM on a CPU, from its study (bench/quality_study.py)."""

from __future__ import annotations

from typing import Dict

BACKBONES = {"bert-large": "bert-large-cased", "bert-large-uncased": "bert-large-uncased",
             "roberta-large": "roberta-large"}


def _r(task, model, batch, lr, prefix_len, epochs, dropout, seed, **extra):
    d = dict(task=task, model=model, batch_size=batch, lr=lr, prefix_len=prefix_len, epochs=epochs,
             dropout=dropout, seed=seed, max_length=128)
    d.update(extra)
    return d


#: recipe name -> TrainConfig fields. Every flag given on the command line overrides the recipe.
RECIPES: Dict[str, dict] = {
    "boolq-bert-large": _r("boolq", "bert-large-cased", 32, 5e-3, 40, 100, 0.1, 11),
    "boolq-roberta-large": _r("boolq", "roberta-large", 32, 7e-3, 8, 100, 0.1, 11),
    "copa-bert-large": _r("copa", "bert-large-cased", 16, 1e-2, 16, 80, 0.1, 44),
    "copa-roberta-large": _r("copa", "roberta-large", 16, 9e-3, 8, 120, 0.1, 11),
    "rte-bert-large": _r("rte", "bert-large-cased", 32, 1e-2, 20, 60, 0.1, 11),
    "rte-roberta-large": _r("rte", "roberta-large", 32, 5e-3, 128, 100, 0.1, 11),
    "wic-bert-large": _r("wic", "bert-large-cased", 16, 1e-4, 20, 80, 0.1, 44, projection=True, template=1),
    "wic-roberta-large": _r("wic", "roberta-large", 32, 1e-2, 8, 50, 0.1, 11, template=0),
    "conll2003-roberta-large": _r("conll2003", "roberta-large", 16, 3e-2, 11, 30, 0.1, 11, max_length=152),
    "squad-roberta-large": _r("squad", "roberta-large", 8, 5e-3, 16, 30, 0.2, 11, max_length=384),
    "squad2-roberta-large": _r("squad_v2", "roberta-large", 8, 5e-3, 8, 10, 0.2, 11, max_length=384),
    # ours: the best setting of the SST-2 study (4,000 training sentences, a few minutes on one core)
    "sst2-minilm": _r("sst2", "sentence-transformers/all-MiniLM-L6-v2", 32, 2e-2, 16, 3, None, 0, max_length=64,
                      max_train_samples=4000, pooling="mean"),
}

#: the reported dev score of each recipe: the authors' (their README re-runs, one RTX 3090), or ours
REPORTED = {
    "boolq-bert-large": "acc 74.3", "boolq-roberta-large": "acc 84.0",
    "copa-bert-large": "acc 77.0", "copa-roberta-large": "acc 92.0",
    "rte-bert-large": "acc 80.1", "rte-roberta-large": "acc 86.6",
    "wic-bert-large": "acc 75.1", "wic-roberta-large": "acc 73.7",
    "conll2003-roberta-large": "F1 91.8",
    "squad-roberta-large": "EM 88.1 / F1 94.2", "squad2-roberta-large": "EM 81.3 / F1 84.7",
    "sst2-minilm": "acc 82.5, 3 seeds (this project's study, bench/results/cpu/quality)",
}


def get_recipe(name: str) -> dict:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))} (see `ptv2 recipes`)")
    return dict(RECIPES[name])


def format_recipes() -> str:
    cols = ("task", "model", "batch_size", "lr", "prefix_len", "epochs", "dropout", "seed", "max_length")
    head = ["recipe"] + [c.replace("_size", "").replace("_len", " len") for c in cols] + ["notes", "reported"]
    rows = []
    for name, r in RECIPES.items():
        notes = []
        if r.get("projection"):
            notes.append("projection")
        if "template" in r:
            notes.append(f"template {r['template']}")
        if r["task"] == "copa":
            notes.append("multiple choice")
        if r.get("pooling"):
            notes.append(f"{r['pooling']} pooling")
        if r.get("max_train_samples"):
            notes.append(f"first {r['max_train_samples']} train examples")
        rows.append([name] + [f"{r[c]:g}" if isinstance(r[c], float) else "-" if r[c] is None else str(r[c])
                              for c in cols]
                    + [", ".join(notes), REPORTED.get(name, "")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows])
