"""Generation in ``ptv2 train`` and ``ptv2 predict`` (``--task custom`` with source/target files), on tiny
random decoders and encoder-decoders with word-level tokenizers (no hub): the loss falls, evaluation
generates and scores with sacrebleu and rouge-score, the decoded outputs are written beside the metrics,
and ``ptv2 predict`` on the saved run generates what the run's evaluation generated."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

from helpers import write_csv  # noqa: E402
from ptv2_kernels.hf.testing import tiny_generation_model  # noqa: E402
from ptv2_kernels.tasks import get_task  # noqa: E402
from ptv2_kernels.tasks import metrics as M  # noqa: E402
from ptv2_kernels.train.cli import main  # noqa: E402

NAMES = ["alpha", "bravo", "charlie", "delta", "echo"]
FOODS = ["rice", "fish", "soup", "bread"]
AREAS = ["riverside", "centre"]


def _rows():
    """A table-to-text toy in E2E's shape: attribute-value pairs to one sentence."""
    return [{"source": f"name [ {n} ] food [ {f} ] area [ {a} ]", "target": f"{n} serves {f} in the {a} ."}
            for n in NAMES for f in FOODS for a in AREAS]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    rows = _rows()
    dev = [dict(r, target=[r["target"], r["target"].replace("serves", "has")]) for r in rows[::5]]  # 2 references
    return d, _jsonl(d / "train.jsonl", rows), _jsonl(d / "dev.jsonl", dev)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    texts = [r["source"] + " " + r["target"] for r in _rows()] + ["has"]
    root = tmp_path_factory.mktemp("models")
    # T5's tiny record draws large weights (varied random generations); a loss of about 55 is too noisy here
    scale = {"t5": dict(initializer_factor=1.0)}
    return {t: tiny_generation_model(root / t, t, texts, **scale.get(t, {})) for t in ("gpt2", "llama", "bart", "t5")}


def _train(tmp_path, data, model, *flags):
    _, train_file, dev_file = data
    out = tmp_path / "run"
    argv = ["train", "--task", "custom", "--train-file", str(train_file), "--dev-file", str(dev_file),
            "--model", model, "--output-dir", str(out), "--max-length", "32", "--max-new-tokens", "12",
            "--batch-size", "8", "--threads", "1", "--no-progress", *flags]
    assert main(argv) == 0
    return out


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bart", "t5"])
def test_generation_run_trains_scores_writes_outputs_and_predicts(tmp_path, data, models, model_type):
    out = _train(tmp_path, data, models[model_type], "--epochs", "2", "--lr", "3e-2", "--prefix-len", "4")
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "custom" and m["main_metric"] == "bleu" and m["status"] == "completed"
    assert set(m["epochs"][-1]["dev"]) == {"bleu", "rougeL"}
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    half = len(losses) // 2
    assert sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half  # the loss falls
    # the decoded outputs of every evaluation beside the metrics, the best one's inside best/
    rows = [json.loads(line) for line in (out / "dev_outputs" / "dev-epoch2.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in data[2].read_text().splitlines()]
    assert [r["source"] for r in rows] == [d["source"] for d in dev]
    assert [r["references"] for r in rows] == [d["target"] for d in dev]
    generated = [r["generation"] for r in rows]
    scores = m["epochs"][-1]["dev"]
    assert scores["bleu"] == pytest.approx(M.bleu(generated, [d["target"] for d in dev]))
    assert scores["rougeL"] == pytest.approx(M.rouge_l(generated, [d["target"] for d in dev]))
    assert (out / "best" / "dev_outputs.jsonl").is_file()
    spec = json.loads((out / "best" / "task.json").read_text())
    assert spec["options"] == {"generation": True, "num_beams": 1, "max_new_tokens": 12,
                               "layout": "encoder_decoder" if model_type in ("bart", "t5") else "decoder"}
    # the saved run generates, reloaded in another model, what its evaluation generated (greedy)
    best_rows = [json.loads(line) for line in (out / "best" / "dev_outputs.jsonl").read_text().splitlines()]
    pred = tmp_path / "pred.jsonl"
    assert main(["predict", "--run", str(out), "--input", str(data[2]), "--output", str(pred),
                 "--batch-size", "3"]) == 0
    assert [json.loads(line) for line in pred.read_text().splitlines()] == [
        {"generation": r["generation"]} for r in best_rows]


def test_finetune_learns_the_toy_and_beam_search_scores_it(tmp_path, data, models):
    """Fine-tuning the tiny decoder learns the template (BLEU far above a random model's), and the run
    scores with beam search when asked."""
    out = _train(tmp_path, data, models["llama"], "--method", "finetune", "--epochs", "6", "--lr", "1e-2",
                 "--num-beams", "2")
    m = json.loads((out / "metrics.json").read_text())
    assert m["best_metrics"]["bleu"] > 0.3 and m["config"]["num_beams"] == 2


@pytest.mark.parametrize("model_type", ["llama", "bart"])
def test_loss_is_on_the_target_tokens_only(models, model_type):
    from transformers import AutoConfig, AutoTokenizer

    task = get_task("custom", generation=True, max_new_tokens=8)
    task.fit_backbone(AutoConfig.from_pretrained(models[model_type]))
    tok = AutoTokenizer.from_pretrained(models[model_type])
    ex = [{"source": "name [ alpha ] food [ rice ]", "targets": ["alpha serves rice .", "alpha has rice ."]}]
    train, dev = task.encode(ex, tok, 32, "train"), task.encode(ex, tok, 32, "dev")
    assert len(train) == 2 and len(dev) == 1  # one training pair per reference; one source to generate for
    target = tok("alpha serves rice .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, labels = train.columns["input_ids"][0], train.columns["labels"][0]
    if model_type == "llama":  # <s> source <sep> target </s>, the loss on the target alone
        n = len(dev.columns["input_ids"][0])
        assert ids[:n] == dev.columns["input_ids"][0] and ids[n:] == target
        assert labels == [-100] * n + target
    else:  # the encoder reads the source; the labels are the target, shifted into the decoder by the model
        assert ids == dev.columns["input_ids"][0] and labels == target


def test_sources_longer_than_the_budget_are_cut_so_the_answer_fits(models):
    from transformers import AutoConfig, AutoTokenizer

    task = get_task("custom", generation=True, max_new_tokens=4)
    task.fit_backbone(AutoConfig.from_pretrained(models["gpt2"]))
    tok = AutoTokenizer.from_pretrained(models["gpt2"])
    ex = [{"source": " ".join(["alpha"] * 30), "targets": ["bravo serves fish in the centre ."]}]
    feats = task.encode(ex, tok, 12, "train")
    assert len(feats.columns["input_ids"][0]) == 12  # 7 source tokens + <sep> + 4 target tokens
    assert feats.columns["labels"][0][-4:] == tok("bravo serves fish in", add_special_tokens=False)["input_ids"]


def test_left_padding_for_decoders_generates_each_row_as_alone(models):
    """Rows of one batch generate what each generates alone (decoders continue from the right end)."""
    from transformers import AutoConfig, AutoTokenizer

    from ptv2_kernels import PrefixModelForGeneration

    task = get_task("custom", generation=True, max_new_tokens=5)
    task.fit_backbone(AutoConfig.from_pretrained(models["llama"]))
    tok = AutoTokenizer.from_pretrained(models["llama"])
    torch.manual_seed(0)
    model = PrefixModelForGeneration.from_pretrained(models["llama"], prefix_len=3).eval()
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.normal_()
    ex = [{"source": s, "targets": []} for s in ("name [ alpha ]", "name [ bravo ] food [ soup ] area [ centre ]")]
    feats = task.encode(ex, tok, 32, "dev")
    together = task.infer(model, feats.batch([0, 1], 0))
    assert together == [task.infer(model, feats.batch([i], 0))[0] for i in (0, 1)]
    assert any(together)  # a random prefix makes the random model say something


@pytest.mark.parametrize("rows,message", [
    ([{"source": "name [ alpha ]"}], "missing field(s) target"),
    ([{"source": "name [ alpha ]", "target": ""}], "target must be a non-empty string or a list of them"),
    ([{"source": 3, "target": "x"}], "source must be a non-empty string"),
])
def test_bad_rows_are_one_line_errors_that_create_nothing(tmp_path, models, capsys, rows, message):
    bad = _jsonl(tmp_path / "bad.jsonl", rows)
    good = _jsonl(tmp_path / "good.jsonl", _rows()[:2])
    out = tmp_path / "out"
    argv = ["train", "--task", "custom", "--train-file", str(good), "--dev-file", str(bad), "--model",
            models["gpt2"], "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and "bad.jsonl:1" in err, err
    assert not out.exists()


@pytest.mark.parametrize("flags,message", [
    (["--method", "prompt"], "--method must keep the input as given for generation (prefix, lora or finetune)"),
    (["--prefix-layers", "2", "--trunk", "frozen"], "--trunk is for encoder task models"),
    ([], "--model must be a decoder or an encoder-decoder to generate"),  # the packaged MiniLM, an encoder
])
def test_what_cannot_generate_is_a_one_line_error(tmp_path, capsys, flags, message):
    good = _jsonl(tmp_path / "good.jsonl", _rows()[:2])
    out = tmp_path / "out"
    argv = ["train", "--task", "custom", "--train-file", str(good), "--dev-file", str(good), "--output-dir",
            str(out), "--no-progress", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptv2 train: error: ") and "\n" not in err and message in err, err
    assert not out.exists()


def test_generation_flags_need_a_generation_file(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\ngood,1\nbad,0\n")
    assert main(["train", "--task", "custom", "--train-file", str(csv), "--dev-file", str(csv), "--num-beams", "3",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "--num-beams applies to generation" in capsys.readouterr().err


def test_bleu_and_rouge_come_from_the_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps, refs = ["alpha serves rice .", "bravo has fish"], [["alpha serves rice ."], ["bravo serves fish .", "x"]]
    streams = [["alpha serves rice .", "bravo serves fish ."], ["alpha serves rice .", "x"]]
    assert M.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score / 100)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = (scorer.score(refs[0][0], hyps[0])["rougeL"].fmeasure
            + max(scorer.score(r, hyps[1])["rougeL"].fmeasure for r in refs[1])) / 2
    assert M.rouge_l(hyps, refs) == pytest.approx(want)


# ------------------------------------------------------------------------------------ named generation tasks
def test_e2e_nlg_reads_the_official_files_and_scores_every_reference_of_a_source(tmp_path, models):
    """E2E's devset.csv repeats a meaning representation once per reference: one example with all of
    them, scored once; training sees every pair. The run trains from --data-dir and predicts."""
    folder = tmp_path / "data" / "e2e_nlg"
    folder.mkdir(parents=True)
    rows = [(r["source"], r["target"]) for r in _rows()]
    write_csv(folder / "trainset.csv", rows, header=("mr", "ref"))
    dev = [(s, t) for s, t in rows[:4] for t in (t, t.replace("serves", "has"))]  # 2 references each
    write_csv(folder / "devset.csv", dev, header=("mr", "ref"))
    task = get_task("e2e")
    examples = task.load("dev", tmp_path / "data", explicit_dir=True)
    assert [e["source"] for e in examples] == [s for s, _ in rows[:4]] and all(len(e["targets"]) == 2 for e in examples)
    out = tmp_path / "run"
    assert main(["train", "--task", "e2e_nlg", "--data-dir", str(tmp_path / "data"), "--model", models["gpt2"],
                 "--max-steps", "2", "--max-new-tokens", "8", "--num-beams", "2", "--max-length", "32",
                 "--output-dir", str(out), "--threads", "1", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "e2e_nlg" and m["n_train"] == len(rows) and m["n_dev_examples"] == 4
    spec = json.loads((out / "best" / "task.json").read_text())
    assert spec["options"] == {"num_beams": 2, "max_new_tokens": 8, "layout": "decoder"}
    outputs = [json.loads(line) for line in (out / "best" / "dev_outputs.jsonl").read_text().splitlines()]
    assert [len(o["references"]) for o in outputs] == [2, 2, 2, 2]
    inputs = _jsonl(tmp_path / "sources.jsonl", [{"source": s} for s, _ in rows[:4]])
    assert main(["predict", "--run", str(out), "--input", str(inputs), "--output", str(tmp_path / "p.jsonl")]) == 0
    assert [json.loads(line)["generation"] for line in (tmp_path / "p.jsonl").read_text().splitlines()] == \
           [o["generation"] for o in outputs]


def test_xsum_reads_document_and_summary(tmp_path, models):
    folder = tmp_path / "data" / "xsum"
    folder.mkdir(parents=True)
    rows = [{"document": r["source"], "summary": r["target"], "id": str(i)} for i, r in enumerate(_rows())]
    _jsonl(folder / "train.jsonl", rows)
    _jsonl(folder / "validation.jsonl", rows[:3])
    out = tmp_path / "run"
    assert main(["train", "--task", "xsum", "--data-dir", str(tmp_path / "data"), "--model", models["bart"],
                 "--max-steps", "1", "--max-new-tokens", "8", "--output-dir", str(out), "--threads", "1",
                 "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_dev_examples"] == 3 and set(m["best_metrics"]) == {"bleu", "rougeL"}
    bad = tmp_path / "bad"
    (bad / "xsum").mkdir(parents=True)
    _jsonl(bad / "xsum" / "train.jsonl", [{"document": "a text", "title": "no summary"}])
    _jsonl(bad / "xsum" / "validation.jsonl", rows[:1])
    with pytest.raises(Exception, match=r"train.jsonl:1: needs a non-empty string in one of the columns summary, target"):
        get_task("xsum").load("train", bad, explicit_dir=True)


def test_projection_on_an_encoder_decoder_trains_one_mlp_per_attention_kind(tmp_path, data, models):
    """Li and Liang's BART: the encoder self-attention, decoder self-attention and cross-attention
    prefixes each from an MLP of their own; saved, reloaded, and predicting what the run generated."""
    from safetensors.torch import load_file

    out = _train(tmp_path, data, models["bart"], "--projection", "--prefix-hidden", "16", "--max-steps", "2")
    weights = load_file(str(out / "best" / "model.safetensors"))
    assert {k.split(".")[2] for k in weights if k.startswith("prefix_encoder.trans.")} == {"0", "1", "2"}
    pred = tmp_path / "pred.jsonl"
    assert main(["predict", "--run", str(out), "--input", str(data[2]), "--output", str(pred)]) == 0
    best = [json.loads(line)["generation"] for line in (out / "best" / "dev_outputs.jsonl").read_text().splitlines()]
    assert [json.loads(line)["generation"] for line in pred.read_text().splitlines()] == best


@pytest.mark.parametrize("model_type", ["gpt2", "bart"])
def test_finetuning_a_model_with_tied_weights_saves_and_reloads(tmp_path, data, models, model_type):
    """GPT-2's LM head and BART's embeddings are one tensor under several names: saved once, reloaded
    into all of them, and the reloaded run generates what it generated."""
    out = _train(tmp_path, data, models[model_type], "--method", "finetune", "--lr", "1e-2", "--max-steps", "2")
    pred = tmp_path / "pred.jsonl"
    assert main(["predict", "--run", str(out), "--input", str(data[2]), "--output", str(pred)]) == 0
    best = [json.loads(line)["generation"] for line in (out / "best" / "dev_outputs.jsonl").read_text().splitlines()]
    assert [json.loads(line)["generation"] for line in pred.read_text().splitlines()] == best
