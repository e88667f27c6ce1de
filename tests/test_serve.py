"""``ptv2 serve``: runs stacked into one bank, mixed batches over HTTP, bad input, refusals, shutdown.

Runs are freshly initialized task models saved as ``ptv2 train`` saves them, on a tiny random BERT
that reads MiniLM's tokenizer. All traffic goes to 127.0.0.1, bounded in count and time.
"""

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from ptv2_kernels.serve.app import build_app, make_server  # noqa: E402
from ptv2_kernels.serve.bank import load_bank  # noqa: E402
from ptv2_kernels.serve.client import Connection, post_all  # noqa: E402
from ptv2_kernels.serve.testing import write_run, write_tiny_backbone  # noqa: E402
from ptv2_kernels.train.cli import main  # noqa: E402
from ptv2_kernels.train.predict import load_model, load_task, model_dir, predictions  # noqa: E402

HOST = "127.0.0.1"
CONTEXT = ("John Smith lives in Paris, where he works as a baker. He moved there from Lyon in 2010 with his "
           "sister Anna, who teaches music at a school near the river.")
# (task, text, text_pair) per served task: sentence pairs, single sentences, regression, tags, spans
SAMPLES = {
    "sst2": [("a lovely, moving film", None), ("the plot never holds together", None)],
    "sst2b": [("a lovely, moving film", None), ("dull", None)],
    "cb": [("It is raining.", "The ground is dry."), ("She left early.", "She was not there at nine.")],
    "stsb": [("A man plays a guitar.", "Someone plays music."), ("A cat sleeps.", "The market fell.")],
    "conll2003": [("John Smith lives in Paris", None), ("EU rejects German call to boycott British lamb .", None)],
    "squad_v2": [("Where does John live?", CONTEXT), ("What does Anna teach?", CONTEXT)],
    "rte": [("A man plays a guitar.", "Someone makes music."), ("The sun is hot.", "It is cold.")],
    "wic": [("bank: I sat by the bank.", "bank: The bank lent money."), ("run: I run.", "run: A run of luck.")],
}
WORDS = "the a film plot music river paris john anna school market cat guitar sun rain lovely dull".split()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    backbone = write_tiny_backbone(root / "backbone")
    specs = [str(write_run(root / "sst2", backbone, "sst2", seed=1)),
             "sst2b=" + str(write_run(root / "sst2-other", backbone, "sst2", seed=2)),
             str(write_run(root / "cb", backbone, "cb", seed=3, pooling="mean")),
             str(write_run(root / "stsb", backbone, "stsb", seed=4)),
             str(write_run(root / "ner", backbone, "conll2003", seed=5)),
             # max length 48: the context is read in several strided windows
             str(write_run(root / "qa", backbone, "squad_v2", seed=6, max_length=48, task_options={"doc_stride": 16})),
             str(write_run(root / "bank", backbone, "rte,wic", seed=7))]
    return root, backbone, specs


@contextlib.contextmanager
def serving(bank, **options):
    """The app on uvicorn in a thread, on a free loopback port; stopped as SIGTERM stops it."""
    server, sock = make_server(build_app(bank, threads=1, **options), HOST, 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def served(runs):
    with torch.inference_mode(False):
        bank = load_bank(runs[2])
    with serving(bank, max_batch_size=32, batch_timeout_ms=5) as port:
        yield bank, port


def request(port, method, path, body=b""):
    async def go():
        conn = Connection(HOST, port)
        try:
            return await conn.request(method, path, body)
        finally:
            await conn.close()
    status, data = asyncio.run(go())
    return status, json.loads(data) if data.startswith((b"{", b"[")) else data.decode()


def alone(bank, task, rows):
    """What the task's own run, loaded alone as ``ptv2 predict`` loads it, answers for ``rows``."""
    entry = bank.entries[task]
    saved = model_dir(entry.run.path)
    spec, max_length = load_task(saved)
    model, tokenizer = load_model(saved, spec)
    return predictions(spec, model, tokenizer, max_length, [entry.example(t, p) for t, p in rows], 16)


def same_answer(got, want):
    """Labels exactly (a regression's value, and every score, to float rounding: the batch pads rows
    differently)."""
    if isinstance(want["label"], float):
        assert got["label"] == pytest.approx(want["label"], rel=1e-4, abs=1e-5)
    else:
        assert got["label"] == want["label"]
    flat = lambda s: s if isinstance(s, list) else [s]  # noqa: E731 - per word for token classification
    for g, w in zip(flat(got["scores"]), flat(want["scores"])):
        assert g.keys() == w.keys()
        for k in g:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (k, g[k], w[k])
    assert {k: v for k, v in got.items() if k not in ("label", "scores", "task")} == \
           {k: v for k, v in want.items() if k not in ("label", "scores", "task")}


def test_every_answer_equals_its_run_alone(served):
    bank, port = served
    bodies = [{"task": t, "text": a, "text_pair": b} for t, rows in SAMPLES.items() for a, b in rows]
    answers = asyncio.run(post_all(HOST, port, bodies, concurrency=len(bodies)))  # concurrent: mixed batches
    assert [s for s, _, _ in answers] == [200] * len(bodies), answers
    i = 0
    for task, rows in SAMPLES.items():
        for want in alone(bank, task, rows):
            got = answers[i][1]
            assert got["task"] == task
            same_answer(got, want)
            i += 1
    ner = answers[list(SAMPLES).index("conll2003") * 2][1]
    assert ner["words"] == ["John", "Smith", "lives", "in", "Paris"] and len(ner["label"]) == 5
    assert set(answers[list(SAMPLES).index("squad_v2") * 2][1]["scores"]) == {"answer", "null"}


def test_2000_concurrent_mixed_requests_none_lost_or_mixed_up(served):
    bank, port = served
    rng = random.Random(0)
    tasks = [t for t in SAMPLES if t != "squad_v2"] * 2 + ["squad_v2"]  # QA requests cost several windows
    bodies = []
    for i in range(2000):
        task = rng.choice(tasks)
        text = f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        pair = SAMPLES[task][0][1] and " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        if task == "squad_v2":
            text, pair = f"Who is {i}?", CONTEXT
        bodies.append({"task": task, "text": text, "text_pair": pair})
    t0 = time.monotonic()
    answers = asyncio.run(asyncio.wait_for(post_all(HOST, port, bodies, concurrency=2000), timeout=300))
    assert time.monotonic() - t0 < 300
    assert sum(s == 200 for s, _, _ in answers) == 2000, [a for a in answers if a[0] != 200][:3]
    for task in SAMPLES:
        mine = [i for i, b in enumerate(bodies) if b["task"] == task]
        want = alone(bank, task, [(bodies[i]["text"], bodies[i]["text_pair"]) for i in mine])
        for i, w in zip(mine, want):
            assert answers[i][1]["task"] == task
            same_answer(answers[i][1], w)
    status, text = request(port, "GET", "/metrics")
    mixed = [line for line in text.splitlines() if line.startswith("ptv2_serve_batch_tasks_count")]
    tasks_per_batch = [line for line in text.splitlines() if line.startswith("ptv2_serve_batch_tasks_sum")]
    assert float(tasks_per_batch[0].split()[-1]) > float(mixed[0].split()[-1])  # batches mixed their tasks


BAD = [
    (b"{not json", 400, "invalid JSON"),
    (b"[1, 2]", 400, "JSON object, got a JSON list"),
    (json.dumps({"text": "hi"}), 422, "task must be a string"),
    (json.dumps({"task": 3, "text": "hi"}), 422, "task must be a string naming a served task, got a JSON number"),
    (json.dumps({"task": "mnli", "text": "hi"}), 422, "task must be one of the served tasks"),
    (json.dumps({"task": "sst2"}), 422, "text must be a non-empty string, got nothing"),
    (json.dumps({"task": "sst2", "text": "  "}), 422, "text must be a non-empty string, got an empty string"),
    (json.dumps({"task": "sst2", "text": ["a"]}), 422, "text must be a non-empty string, got a JSON array"),
    (json.dumps({"task": "cb", "text": "a", "text_pair": ""}), 422, "text_pair must be a non-empty string or null"),
    (json.dumps({"task": "cb", "text": "a", "text_pair": 1.5}), 422, "text_pair must be a non-empty string or null, got a JSON number"),
    (json.dumps({"task": "sst2", "text": "a", "path": "/etc/passwd"}), 422, "unknown field(s) ['path']"),
    (json.dumps({"task": "sst2", "text": "word " * 80}), 422, "text is 82 tokens, over task sst2's max length 64"),
    (json.dumps({"task": "cb", "text": "word " * 40, "text_pair": "word " * 40}), 422,
     "text and text_pair are 83 tokens, over task cb's max length 64"),
    (json.dumps({"task": "conll2003", "text": "John", "text_pair": "Paris"}), 422, "text_pair must be absent"),
    (json.dumps({"task": "squad_v2", "text": "Who?"}), 422, "text_pair must be the context"),
    (json.dumps({"task": "squad_v2", "text": "who " * 60, "text_pair": "x"}), 422, "does not fit task squad_v2's max length 48"),
    (json.dumps({"task": "sst2", "text": "a" * 70000}), 413, "body must be at most 65536 bytes"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_request_gets_4xx_naming_what_was_wrong_and_the_server_keeps_serving(served, body, status, message):
    _, port = served
    got, answer = request(port, "POST", "/predict", body if isinstance(body, bytes) else body.encode())
    assert got == status and message in answer["error"], answer
    assert "\n" not in answer["error"]
    assert request(port, "POST", "/predict", json.dumps({"task": "sst2", "text": "fine"}).encode())[0] == 200


def test_unknown_routes_and_methods_answer_json(served):
    _, port = served
    assert request(port, "GET", "/predict") == (405, {"error": "GET /predict: Method Not Allowed"})
    assert request(port, "POST", "/load?path=/tmp/x") == (404, {"error": "POST /load: Not Found"})


def test_health_and_metrics(served):
    bank, port = served
    status, health = request(port, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["tasks"] == bank.tasks
    assert set(health["tasks"]) == set(SAMPLES)
    request(port, "POST", "/predict", json.dumps({"task": "sst2", "text": "fine"}).encode())
    request(port, "POST", "/predict", json.dumps({"task": "nope", "text": "fine"}).encode())
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    assert 'ptv2_serve_requests_total{status="200",task="sst2"}' in text
    assert 'ptv2_serve_requests_total{status="422",task="-"}' in text  # unknown names never become labels
    for name in ("ptv2_serve_request_seconds_bucket{", "ptv2_serve_batch_size_bucket{", "ptv2_serve_batch_seconds_sum"):
        assert name in text


def test_predict_writes_what_the_server_answers_for_tags_and_spans(served, tmp_path):
    bank, port = served
    for task in ("conll2003", "squad_v2"):
        rows = SAMPLES[task]
        inputs = tmp_path / f"{task}.jsonl"
        inputs.write_text("".join(json.dumps({"text": a, "text_pair": b}) + "\n" for a, b in rows))
        out = tmp_path / f"{task}.out.jsonl"
        assert main(["predict", "--run", bank.entries[task].run.path, "--input", str(inputs), "--output", str(out)]) == 0
        for line, (a, b) in zip(out.read_text().splitlines(), rows):
            status, answer = request(port, "POST", "/predict", json.dumps({"task": task, "text": a, "text_pair": b}).encode())
            assert status == 200
            same_answer(answer, json.loads(line))


@pytest.mark.parametrize("case", ["backbone", "prefix_len", "prefix_layers", "same task", "finetune"])
def test_runs_that_cannot_share_a_bank_are_refused_at_start_in_one_line(runs, tmp_path, capsys, case):
    root, backbone, specs = runs
    if case == "backbone":
        other = write_run(tmp_path / "run", write_tiny_backbone(tmp_path / "other-backbone", seed=1), "cb")
        expect = "has backbone"
    elif case == "prefix_len":
        other, expect = write_run(tmp_path / "run", backbone, "cb", prefix_len=6), "has prefix_len 6"
    elif case == "prefix_layers":
        other, expect = write_run(tmp_path / "run", backbone, "cb", prefix_layers=[1]), "has prefix_layers [1]"
    elif case == "same task":
        other, expect = write_run(tmp_path / "run", backbone, "rte"), "serves task 'rte'"
    else:
        other, expect = write_run(tmp_path / "run", backbone, "cb", method="finetune"), "method 'finetune'"
    capsys.readouterr()  # what writing the runs printed
    assert main(["serve", specs[0], specs[-1], str(other), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("ptv2 serve: error: RUN ") and expect in err, err


def test_runs_with_prefixes_on_some_layers_serve_what_they_answer_alone(runs, tmp_path):
    """Runs trained with --prefix-layers stack into a bank on those layers (the others read nothing)."""
    _, backbone, _ = runs
    specs = [str(write_run(tmp_path / "a", backbone, "sst2", seed=8, prefix_layers=[1])),
             str(write_run(tmp_path / "b", backbone, "cb", seed=9, prefix_layers=[1]))]
    with torch.inference_mode(False):
        bank = load_bank(specs)
    rows = {"sst2": SAMPLES["sst2"], "cb": SAMPLES["cb"]}
    prepared = [bank.prepare(t, a, b) for t, pairs in rows.items() for a, b in pairs]
    got = bank.run(prepared)  # one mixed batch
    want = [w for t, pairs in rows.items() for w in alone(bank, t, pairs)]
    for g, w in zip(got, want):
        same_answer(g, w)


def test_a_backbone_saved_as_a_pickle_is_refused(tmp_path, capsys):
    """Weights load from safetensors only: a backbone folder holding only pytorch_model.bin is refused."""
    from safetensors.torch import load_file

    backbone = write_tiny_backbone(tmp_path / "backbone")
    run = write_run(tmp_path / "run", backbone, "cb")
    weights = tmp_path / "backbone" / "model.safetensors"
    torch.save(load_file(str(weights)), str(tmp_path / "backbone" / "pytorch_model.bin"))
    weights.unlink()
    capsys.readouterr()
    assert main(["serve", str(run), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "must load from safetensors files" in err, err


def test_shutdown_answers_the_requests_in_flight(runs):
    """SIGTERM while 24 requests wait in a batch: every one is answered, then the process ends."""
    _, _, specs = runs
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "ptv2_kernels.train", "serve", specs[0], specs[-1], "--port", "0",
                             "--batch-timeout-ms", "1500", "--max-batch-size", "64", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.rsplit(":", 1)[1])
        bodies = [{"task": "sst2" if i % 2 else "rte", "text": f"row {i}", "text_pair": None if i % 2 else "a pair"}
                  for i in range(24)]

        async def send_then_stop():
            pending = asyncio.ensure_future(post_all(HOST, port, bodies, concurrency=len(bodies)))
            await asyncio.sleep(0.5)  # the requests are in the server, waiting for their batch to close
            proc.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(pending, timeout=60)

        answers = asyncio.run(send_then_stop())
        assert [s for s, _, _ in answers] == [200] * len(bodies)
        assert [a["task"] for _, a, _ in answers] == [b["task"] for b in bodies]
        # uvicorn, once shut down, raises the signal it caught again, so the exit reads as SIGTERM's
        assert proc.wait(timeout=60) == -signal.SIGTERM
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------ generation
GEN_SOURCES = ["name [ alpha ] food [ rice ]", "name [ bravo ] food [ soup ] area [ riverside ]", "food [ fish ]"]


@pytest.fixture(scope="module", params=["llama", "bart"])
def generation_runs(request, tmp_path_factory):
    """Three generation runs on one tiny decoder (or encoder-decoder): two greedy, one with beam search
    and a shorter answer (its rows generate in a call of their own)."""
    from ptv2_kernels.hf.testing import tiny_generation_model

    root = tmp_path_factory.mktemp(f"serve-{request.param}")
    words = GEN_SOURCES + ["alpha serves rice in the riverside centre area ."]
    backbone = tiny_generation_model(root / "backbone", request.param, words)
    greedy, beams = dict(generation=True, max_new_tokens=6), dict(generation=True, max_new_tokens=4, num_beams=2)
    return [f"{name}=" + str(write_run(root / name, backbone, "custom", task_options=options, seed=seed, max_length=24))
            for name, options, seed in (("e2e", greedy, 1), ("dart", greedy, 2), ("xsum", beams, 3))]


def test_generate_answers_each_row_as_its_run_alone_in_mixed_batches(generation_runs):
    with torch.inference_mode(False):
        bank = load_bank(generation_runs)
    bodies = [{"task": t, "text": s} for s in GEN_SOURCES for t in ("e2e", "dart", "xsum")]
    with serving(bank, max_batch_size=16, batch_timeout_ms=50) as port:
        answers = asyncio.run(post_all(HOST, port, bodies, concurrency=len(bodies), path="/generate"))
        wrong = request(port, "POST", "/predict", json.dumps({"task": "e2e", "text": "food [ fish ]"}).encode())
        pair = request(port, "POST", "/generate", json.dumps({"task": "e2e", "text": "a", "text_pair": "b"}).encode())
        long = request(port, "POST", "/generate", json.dumps({"task": "e2e", "text": "alpha " * 40}).encode())
    assert [s for s, _, _ in answers] == [200] * len(bodies), answers
    for task in ("e2e", "dart", "xsum"):
        want = alone(bank, task, [(s, None) for s in GEN_SOURCES])
        got = [a for (_, a, _), b in zip(answers, bodies) if b["task"] == task]
        assert [{k: v for k, v in g.items() if k != "task"} for g in got] == want
    assert len({a["generation"] for _, a, _ in answers}) > 1  # the tasks' prefixes say different things
    assert wrong[0] == 422 and "generates text: POST /generate" in wrong[1]["error"]
    assert pair[0] == 422 and "text_pair must be null" in pair[1]["error"]
    assert long[0] == 422 and "over task e2e's max length" in long[1]["error"]


def test_generate_on_a_server_of_classifiers_names_predict(served):
    _, port = served
    status, answer = request(port, "POST", "/generate", json.dumps({"task": "sst2", "text": "fine"}).encode())
    assert status == 422 and "does not generate: POST /predict" in answer["error"]


def test_generation_and_other_runs_are_not_served_together(runs, generation_runs, capsys):
    capsys.readouterr()
    assert main(["serve", runs[2][0], generation_runs[0], "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "generates but" in err and "LM head" in err, err


def test_split_by_length_finds_the_cheapest_cut():
    """Against every way to cut a short sorted list: the cut returned costs the least."""
    import itertools

    from ptv2_kernels.serve.bank import split_by_length

    rng = random.Random(0)
    for _ in range(30):
        sizes = sorted(((rng.choice([1, 1, 3]), rng.randint(3, 60)) for _ in range(rng.randint(1, 7))),
                       key=lambda s: s[1])
        overhead = rng.choice([0, 5, 23, 200])
        cost = lambda cuts: sum(overhead + sum(r for r, _ in sizes[a:b]) * sizes[b - 1][1] for a, b in cuts)  # noqa: E731
        n = len(sizes)
        every = [list(zip((0,) + c, c + (n,))) for k in range(n) for c in itertools.combinations(range(1, n), k)]
        got = split_by_length(sizes, overhead)
        assert got[0][0] == 0 and got[-1][1] == n and all(a[1] == b[0] for a, b in zip(got, got[1:]))
        assert cost(got) == min(map(cost, every))
    assert split_by_length([(1, 5), (1, 50)], None) == [(0, 2)] and split_by_length([], 23) == []
