"""experiments/chat_mix.py: the held-out families never reach the distillation mix, and their checkers
score right answers right and wrong answers wrong."""
import json

import pytest

import data as D
from experiments import chat_mix as X
from test_gguf import tiny_parent_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


def test_heldout_family_finds_each_family_and_nothing_else():
    hits = {"What is 3 + 4? Answer with the number only.": "sums", "So 3+4 = 7.": "sums", "add 2 and 5": "sums",
            "What is the sum of three and four?": "word sums", "Nine plus zero is nine.": "word sums",
            "What is the capital of Peru?": "capitals", "Lima is the Capital.": "capitals"}
    misses = ("What is 13 + 4?", "Calculate 66 + 73.", "3.5 + 2 is 5.5", "What is 6 * 7?", "Multiply 6 by 6.",
              "What is the sum of twelve and four?", "Capitalise the word.", "Write a Python function `f(a, b)`.")
    for text, family in hits.items():
        assert X.heldout_family(text) == family, text
    for text in misses:
        assert X.heldout_family(text) is None, text
    for family, probs in X.heldout_tasks().items():  # every held-out question would be dropped from a mix
        assert {X.heldout_family(p["question"]) for p in probs} == {family}


def test_mix_prompts_hold_no_heldout_question_and_cover_every_kind():
    train_docs, _ = D.python_corpus(val_fraction=0.15, seed=0)
    prompts = X.mix_prompts(400, train_docs)
    assert prompts == X.mix_prompts(400, train_docs)  # seeded
    questions = [q for _, q in prompts]
    assert len(set(questions)) == len(questions) and {k for k, _ in prompts} == {"arithmetic", "facts",
                                                                                 "instructions", "code"}
    held = {p["question"] for probs in X.heldout_tasks().values() for p in probs}
    assert not held & set(questions) and not any(X.heldout_family(q) for q in questions)
    code = [q for k, q in prompts if k == "code"]
    assert any("`" in q and "(" in q for q in code)


def test_checkers_score_the_right_answers_only():
    tasks = X.heldout_tasks(4)
    sums, words, capitals = tasks["sums"][0], tasks["word sums"], tasks["capitals"]
    assert sums["check"](f"The answer is {sums['answer']}.", sums["answer"])
    assert not sums["check"](f"The answer is {int(sums['answer']) + 1}.", sums["answer"])
    three_four = next(p for p in words if p["question"] == "What is the sum of three and four?")
    for out, ok in (("The sum of three and four is 7.", True), ("Three plus four is seven.", True),
                    ("It is 7, not eight.", False), ("The sum is 0.7", False), ("The sum is 12.", False), ("", False)):
        assert three_four["check"](out, three_four["answer"]) == ok, out
    for family, probs in tasks.items():  # an answer that echoes the question scores nothing
        for p in probs:
            assert not p["check"](p["question"], p["answer"]), (family, p["question"])
            assert not p["check"](p["question"].replace("What is", "So").rstrip("?") + ".", p["answer"])
    bogota = next(p for p in capitals if p["question"] == "What is the capital of Colombia?")
    assert bogota["check"]("The capital of Colombia is Bogotá.", bogota["answer"])
    assert not bogota["check"]("The capital of Colombia is Medellin.", bogota["answer"])


def test_build_mix_drops_answers_that_touch_a_heldout_family(tmp_path, monkeypatch):
    """The parent's answers are filtered too: an answer that names a capital or states a one-digit sum is
    dropped, an empty one is dropped, a capped one is cut back to its last full sentence."""
    parent, _ = tiny_parent_gguf(tmp_path / "p.gguf")
    canned = [("The capital of Peru is Lima.", False), ("So 3 + 4 = 7.", False), ("", False),
              ("A full sentence. And then a cut", True), ("Fine.", False)]
    monkeypatch.setattr(X, "greedy_answers", lambda model, tok, prompts, n: [canned[i % 5] for i in range(len(prompts))])
    out = tmp_path / "mix.jsonl"
    summary = X.build_mix(str(parent), str(out), n=40)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    answers = [r["messages"][1]["content"] for r in rows]
    assert set(answers) == {"A full sentence.", "Fine."} and not any(X.heldout_family(a) for a in answers)
    assert summary["dropped"] == {"heldout": 2 * summary["prompts"] // 5 + (summary["prompts"] % 5 > 1),
                                  "empty": summary["prompts"] // 5 + (summary["prompts"] % 5 > 2)}
    assert summary["chats"] == len(rows) and json.loads((tmp_path / "mix.jsonl.json").read_text()) == summary


def test_free_text_rows_drop_heldout_answers_and_read_as_documents(tmp_path, monkeypatch):
    """--free-text: the parent's samples become {"text": ...} rows after the chats, filtered as answers are
    and also dropped when they name a held-out capital city (the answer, without the question)."""
    parent, _ = tiny_parent_gguf(tmp_path / "p.gguf")
    canned = [("Lima is lovely in May.", False), ("The capital moved.", False), ("", False),
              ("One sentence. A cut", True), ("Plain text.", False), ("We met in limassol.", False)]
    monkeypatch.setattr(X, "greedy_answers", lambda model, tok, prompts, n: [("Fine.", False)] * len(prompts))
    monkeypatch.setattr(X, "free_text", lambda model, tok, n, *a: canned[:n])
    out = tmp_path / "mix.jsonl"
    summary = X.build_mix(str(parent), str(out), n=3, free=6)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("text") for r in rows] == [None] * 3 + ["One sentence.", "Plain text.", "We met in limassol."]
    assert summary["per_kind"]["free"] == 3 and summary["dropped"] == {"heldout": 2, "empty": 1}
    tok = D.Tokenizer.from_file(str(parent))
    assert D.read_chats(out)[3:] == ["One sentence.", "Plain text.", "We met in limassol."]
    assert summary["tokens"] == len(D.chat_tokens(out, tok))


def test_free_text_samples_from_bos_are_seeded_and_distinct(tmp_path):
    """The tiny parent's free samples on the engine: n of them across batches, the same for the same seed,
    another draw for another seed, and not one row copied across a batch."""
    parent, _ = tiny_parent_gguf(tmp_path / "p.gguf")
    model = X.load_for_answers(str(parent))
    tok = D.Tokenizer.from_file(str(parent))
    a = X.free_text(model, tok, 5, 12, seed=0, batch=2)
    assert len(a) == 5 and a == X.free_text(model, tok, 5, 12, seed=0, batch=2)
    assert a != X.free_text(model, tok, 5, 12, seed=1, batch=2)
    assert len({t for t, _ in a}) == 5


def test_build_mix_with_a_real_parent_writes_chats_the_cascade_reads(tmp_path, monkeypatch):
    """The tiny random parent's answers run on the engine into chats data.chat_tokens reads (its capped
    answers hold no full sentence, so they are kept whole here; with none kept build_mix refuses)."""
    parent, _ = tiny_parent_gguf(tmp_path / "p.gguf")
    out = tmp_path / "mix.jsonl"
    with pytest.raises(ValueError, match="none of the parent's 12 answers was kept"):
        X.build_mix(str(parent), str(out), n=12, max_new_tokens=6)
    assert not out.exists()
    monkeypatch.setattr(X, "_trim", lambda text: text)
    summary = X.build_mix(str(parent), str(out), n=12, max_new_tokens=6)
    tok = D.Tokenizer.from_file(str(parent))
    assert summary["prompts"] == 12 and 0 < summary["chats"] <= 12
    assert summary["tokens"] == len(D.chat_tokens(out, tok)) > 0
    for chat in D.read_chats(out):
        assert [m["role"] for m in chat] == ["user", "assistant"] and chat[1]["content"]


def test_mix_prompts_skip_a_generated_heldout_question(monkeypatch):
    """The prompt filter, not only the generators' ranges, keeps the families out."""
    real, calls = X._arithmetic, []

    def sometimes_heldout(rng):
        calls.append(1)
        return "What is 3 + 4? Answer with the number only." if len(calls) % 2 else real(rng)
    monkeypatch.setattr(X, "_arithmetic", sometimes_heldout)
    prompts = X.mix_prompts(40, [])
    assert len(calls) > 2 and not any(X.heldout_family(q) for _, q in prompts)
    assert sum(k == "arithmetic" for k, _ in prompts) == 14


def test_cli_refuses_an_empty_mix_and_a_greedy_free_text(tmp_path, capsys):
    """No prompt and no free text, or free text at temperature 0, is one error line before any model loads."""
    for argv, said in ((["--prompts", "0"], "not both 0"), (["--free-text", "4", "--free-temperature", "0"],
                                                             "--free-temperature must be positive")):
        with pytest.raises(SystemExit) as e:
            X.main(["--parent", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "m.jsonl")] + argv)
        assert e.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "m.jsonl").exists()
