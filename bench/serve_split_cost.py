"""What one backbone forward costs beyond its rows (``FORWARD_COST_ROWS`` in ptv2_kernels/serve/bank.py),
and what cutting a mixed batch by length saves.

    python bench/serve_split_cost.py [--out bench/results/cpu/serve/split_cost.json]
    python bench/serve_split_cost.py --device cuda     # FORWARD_COST_ROWS["cuda"]: results/<GPU>/serve/

MiniLM at 1 thread: the median process time (CPU seconds of this process, so other work on the machine
inflates it little; on a GPU the wall time of the synchronized forward) of a forward over B x N token
batches, fitted as ``fixed + per_row * B * N``; the overhead in token rows is ``fixed / per_row``. Then
batches of 32 SST-2 dev sentences drawn at random (seeded), as one padded forward against the
sub-batches ``split_by_length`` picks with that overhead, and the dev sentences' mean length in tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHAPES = [(1, 8), (1, 24), (1, 64), (4, 16), (8, 32), (16, 16), (16, 48), (32, 32)]


def forward_seconds(model, rows, reps: int) -> float:
    import torch

    device = next(model.parameters()).device
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    ids, mask = ids.to(device), mask.to(device)
    gpu = device.type == "cuda"
    clock = time.perf_counter if gpu else time.process_time
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # warm-up
        times = []
        for _ in range(reps):
            t0 = clock()
            model(input_ids=ids, attention_mask=mask)
            if gpu:
                torch.cuda.synchronize(device)
            times.append(clock() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    import benchlib
    from ptv2_kernels.hf.testing import minilm_path
    from ptv2_kernels.serve.bank import split_by_length
    from ptv2_kernels.tasks import default_data_dirs, get_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="default results/<cpu or GPU name>/serve/split_cost.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gpu = args.device.startswith("cuda")
    machine = benchlib.safe_name(benchlib.gpu_name()) if gpu else "cpu"
    args.out = args.out or HERE / "results" / machine / "serve" / "split_cost.json"
    model = AutoModel.from_pretrained(minilm_path()).eval().to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    shapes = [dict(B=B, N=N, seconds=forward_seconds(model, [[2000] * N] * B, 5)) for B, N in SHAPES]
    fixed, per_row = np.linalg.lstsq(np.array([[1, s["B"] * s["N"]] for s in shapes], dtype=float),
                                     np.array([s["seconds"] for s in shapes]), rcond=None)[0]
    overhead = fixed / per_row if per_row > 0 else None  # None: rows cost nothing measurable, one batch
    sentences = [tokenizer(e["text_a"])["input_ids"]
                 for e in get_task("sst2").load("dev", default_data_dirs(), explicit_dir=True)]
    rng = random.Random(0)
    batches = []
    for _ in range(args.batches):
        rows = sorted(rng.sample(sentences, 32), key=len)
        cuts = split_by_length([(1, len(r)) for r in rows], overhead)
        batches.append(dict(one=forward_seconds(model, rows, 3), cuts=[[a, b] for a, b in cuts],
                            split=sum(forward_seconds(model, rows[a:b], 3) for a, b in cuts)))
    result = dict(shapes=shapes, fixed_s=float(fixed), per_token_row_s=float(per_row),
                  overhead_rows=None if overhead is None else float(overhead),
                  batches=batches, mean_tokens=statistics.mean(map(len, sentences)), one_median_s=statistics.median(b["one"] for b in batches),
                  split_median_s=statistics.median(b["split"] for b in batches),
                  facts=dict(threads=1, torch=torch.__version__, machine=platform.processor() or platform.machine(),
                             device=machine, clock="wall time, synchronized" if gpu else
                             "process time (CPU seconds of this process)"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    rows = "one batch" if overhead is None else f"{overhead:.0f} rows"
    print(f"fixed {1e3 * fixed:.1f} ms + {1e3 * per_row:.3f} ms per token row: overhead {rows}; "
          f"32 SST-2 requests: one batch {1e3 * result['one_median_s']:.0f} ms, cut by length "
          f"{1e3 * result['split_median_s']:.0f} ms (medians of {args.batches})")
    return result


if __name__ == "__main__":
    main()
