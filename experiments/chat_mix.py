"""A distillation mix for a chat parent, and the task families held out of it.

The paper distils every child on the parent's pretraining mix. A small CPU run cannot cover a general mix,
so a practitioner distils on data that covers the abilities they need to keep. This experiment writes that
data: the parent's own greedy answers, in its chat format, to prompts generated here offline

  - arithmetic: two-digit sums and differences, products and quotients in several phrasings, and
    data.math_problems' word problems;
  - short factual questions from templates and a fixed list;
  - instructions (one sentence about a topic, a synonym, the past tense of a sentence, ...);
  - code: write a function named and documented as one in the Python corpus's training half, or explain
    a few lines of it;
  - optionally (--free-text N) plain text: N of the parent's own samples from BOS alone, with no prompt
    (temperature --free-temperature, top-p 0.95), written as {"text": ...} lines. A sample of the
    teacher's own distribution is the nearest a run without the pretraining mix comes to that mix.

The held-out task families (`HELDOUT`) are scored in experiments/real_parent.py and never enter the mix:
one-digit sums ("What is 3 + 4? ..."), the same sums in number words ("What is the sum of three and
four?"), and capitals ("What is the capital of Peru?"). `heldout_family` finds them in a prompt or an answer, and a chat
in which it finds one is dropped, so the mix holds no one-digit sum, no number-word sum and no mention of a
capital; a free-text sample is dropped also when it names a held-out capital city (so no training text
states a held-out answer). Sequence-level data from the teacher is the standard recipe; the loss on it stays forward KL
(distill.py). The cascade reads the file through --chat-data, at the share of the distillation tokens
given by --chat-share (whole copies of the file).

Run: `python experiments/chat_mix.py --parent smollm2 --out runs/chat_mix.jsonl` (writes the chats and
<out>.json, the counts per kind and what was dropped).
"""

import argparse
import json
import os
import random
import re
import sys
import time
import unicodedata
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the mechanism files

import data as D  # noqa: E402
import generate as G  # noqa: E402
import model as M  # noqa: E402
import train as TR  # noqa: E402

# -----------------------------------------------------------------------------
# Held-out task families: scored, never trained on

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")
CAPITALS = (("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
            ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Austria", "Vienna"),
            ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
            ("the United Kingdom", "London"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Mexico", "Mexico City"),
            ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogota"),
            ("India", "New Delhi"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Turkey", "Ankara"),
            ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Kenya", "Nairobi"), ("Cuba", "Havana"),
            ("the Czech Republic", "Prague"), ("Switzerland", "Bern"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
            ("the Philippines", "Manila"), ("Nigeria", "Abuja"))

_ONE_DIGIT_SUM = re.compile(r"(?<![\d.])\d\s*(\+|plus|and)\s*\d(?![\d.])", re.I)
_CITIES = re.compile(r"\b(%s)\b" % "|".join(city for _, city in CAPITALS), re.I)
_WORD_SUM = re.compile(r"\b(%s)\b\s*(\+|plus|and)\s*\b(%s)\b" % ("|".join(WORDS[:10]), "|".join(WORDS[:10])), re.I)


def heldout_family(text: str):
    """The held-out family a text touches ("sums", "word sums", "capitals"), or None."""
    if _ONE_DIGIT_SUM.search(text):
        return "sums"
    if _WORD_SUM.search(text):
        return "word sums"
    if re.search(r"\bcapital\b", text, re.I):
        return "capitals"
    return None


def _number_in(text: str):
    """The last number of a text, written in digits or as a word up to eighteen; None if there is none."""
    found = re.findall(r"-?\d+(?:\.\d+)?|\b(?:%s)\b" % "|".join(WORDS), text.lower())
    if not found:
        return None
    last = found[-1]
    return WORDS.index(last) if last in WORDS else float(last)


def _fold(text: str) -> str:
    """Lower case without accents ("Bogotá" reads as "bogota")."""
    return "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))


HELDOUT = ("sums", "word sums", "capitals")


def heldout_tasks(n_sums: int = 200, seed: int = 1000) -> dict:
    """{family: [{"question", "answer", "check": (output, answer) -> bool}]}: the held-out problems. The
    operands run from one to nine, so an answer that only echoes the question never ends on the sum."""
    sums = [p | {"check": D.check_math_answer} for p in D.math_problems(n_sums, seed=seed, level="easy")]
    words = [{"question": f"What is the sum of {WORDS[a]} and {WORDS[b]}?", "answer": str(a + b),
              "check": lambda out, ans: _number_in(out) == int(ans)} for a in range(1, 10) for b in range(1, 10)]
    capitals = [{"question": f"What is the capital of {country}?", "answer": city,
                 "check": lambda out, ans: _fold(ans) in _fold(out)} for country, city in CAPITALS]
    return {"sums": sums, "word sums": words, "capitals": capitals}


# -----------------------------------------------------------------------------
# The mix's prompts

ANIMALS = ("dog", "cat", "spider", "bird", "horse", "ant", "cow", "snake", "fish", "octopus", "duck", "bee")
THINGS = ("the sky on a clear day", "grass", "snow", "a ripe banana", "a ripe tomato", "coal", "milk", "an orange",
          "a lemon", "blood", "a polar bear's fur", "a crow")
OPPOSITES = ("hot", "big", "fast", "happy", "early", "light", "open", "full", "strong", "old", "high", "wet", "loud",
             "rich", "hard", "first", "inside", "true", "up", "win")
NOUNS = ("child", "mouse", "box", "city", "leaf", "tooth", "woman", "knife", "goose", "story", "bus", "foot")
TOPICS = ("the ocean", "autumn", "a busy kitchen", "learning to swim", "the moon", "a rainy day", "trains",
          "friendship", "a library", "mountains", "coffee", "the first day of school", "a garden", "winter",
          "music", "a long walk", "birds", "a small town", "computers", "breakfast")
FACTS = ("How many days are in a week?", "How many hours are in a day?", "How many minutes are in an hour?",
         "How many months are in a year?", "What is the boiling point of water in Celsius?",
         "What is the freezing point of water in Celsius?", "Which planet is closest to the Sun?",
         "What is the largest planet in the solar system?", "What gas do plants take in from the air?",
         "What do bees make?", "What is the chemical symbol for water?", "How many continents are there?",
         "What is the largest ocean on Earth?", "Who wrote Romeo and Juliet?", "What language is spoken in Brazil?",
         "What is the tallest animal?", "What is the fastest land animal?", "How many sides does a triangle have?",
         "How many sides does a hexagon have?", "What is the main ingredient of bread?", "What does a thermometer measure?",
         "What is the opposite of north?", "Which season comes after spring?", "What do caterpillars turn into?",
         "What is frozen water called?", "How many legs does an insect have?", "What is the largest mammal?",
         "What shape is a ball?", "Which organ pumps blood through the body?", "What do you call a baby cat?",
         "What do you call a baby dog?", "Which is heavier, a kilogram of iron or a kilogram of feathers?",
         "What color do you get by mixing blue and yellow?", "What color do you get by mixing red and white?",
         "How many strings does a standard guitar have?", "What is the first letter of the English alphabet?",
         "How many players are on a soccer team on the field?", "What is the square root of 81?",
         "What is H2O?", "Which star is at the center of our solar system?")
INSTRUCTIONS = ("Write one sentence about {t}.", "Write a short poem about {t}.", "Give me three facts about {t}.",
                "Describe {t} in two sentences.", "Write a title for a story about {t}.")
EDITS = ("The cat sits on the mat.", "She walks to school.", "We eat dinner at six.", "He reads a book.",
         "They play in the park.", "I write a letter.", "The sun rises in the east.", "The dog runs fast.")


def _arithmetic(rng: random.Random) -> str:
    kind = rng.randrange(6)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if kind == 0:
        return rng.choice(("What is {a} + {b}?", "Calculate {a} + {b}.", "What is {a} plus {b}?")).format(a=a, b=b)
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return rng.choice(("What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.")).format(a=a, b=b)
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return rng.choice(("What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.")).format(a=a, b=b)
    if kind == 3:
        b, q = rng.randint(2, 12), rng.randint(2, 12)
        return rng.choice(("What is {a} divided by {b}?", "What is {a} / {b}?")).format(a=b * q, b=b)
    if kind == 4:
        return f"What is {a} + {b}? Answer with the number only."
    return D.math_problems(1, seed=rng.randrange(10**9))[0]["question"]


def _fact(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"How many legs does a {rng.choice(ANIMALS)} have?"
    if kind == 1:
        return f"What color is {rng.choice(THINGS)}?"
    if kind == 2:
        return f"What is the opposite of \"{rng.choice(OPPOSITES)}\"?"
    if kind == 3:
        return f"What is the plural of \"{rng.choice(NOUNS)}\"?"
    return rng.choice(FACTS)


def _instruction(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(INSTRUCTIONS).format(t=rng.choice(TOPICS))
    if kind == 1:
        return f"Give a synonym for \"{rng.choice(OPPOSITES)}\"."
    if kind == 2:
        return f"Rewrite this sentence in the past tense: {rng.choice(EDITS)}"
    return f"Explain what {rng.choice(TOPICS)} means to people, in one sentence."


_DEF = re.compile(r"^((?:[a-z_][a-z0-9_]*\.)*)([a-z][a-z0-9_]*)\(([^)\n]*)\)\n([A-Z][^\n]{10,150})$", re.M)


def code_prompts(docs: list[str], n: int, seed: int = 0) -> list[str]:
    """Prompts from the corpus's documented functions ("module.name(args)" then the docstring's first
    line): write the function, or say what the library function does."""
    found = sorted({(m.group(1).rstrip("."), m.group(2), m.group(3), m.group(4).strip())
                    for doc in docs for m in _DEF.finditer(doc)})
    rng = random.Random(f"code:{seed}")
    rng.shuffle(found)
    out = []
    for module, name, args, summary in found[:n]:
        args = ", ".join(a for a in args.split(", ") if a != "self")
        if rng.random() < 0.5:
            out.append(f"Write a Python function `{name}({args})`. {summary}")
        else:
            out.append(f"What does the Python function `{module}.{name}` do?" if module else
                       f"What does the Python function `{name}({args})` do?")
    return out


def mix_prompts(n: int, code_docs: list[str], seed: int = 0) -> list[tuple[str, str]]:
    """n distinct (kind, prompt) pairs: 35% arithmetic, 25% facts, 20% instructions, 20% code, none in a
    held-out family."""
    rng = random.Random(f"mix:{seed}")
    want = {"arithmetic": round(0.35 * n), "facts": round(0.25 * n), "instructions": round(0.2 * n)}
    want["code"] = n - sum(want.values())
    out, seen = [], set()
    make = {"arithmetic": _arithmetic, "facts": _fact, "instructions": _instruction}
    for kind, count in want.items():
        pool = iter(code_prompts(code_docs, 4 * count, seed)) if kind == "code" else None
        got, tries = 0, 0
        while got < count and tries < 50 * count:
            tries += 1
            q = next(pool, None) if pool else make[kind](rng)
            if q is None:
                break
            if q in seen or heldout_family(q):
                continue
            seen.add(q)
            out.append((kind, q))
            got += 1
    return out


# -----------------------------------------------------------------------------
# The parent's answers


def _trim(text: str) -> str:
    """A capped answer cut back to its last full line or sentence."""
    cut = max(text.rfind("\n"), *(text.rfind(p) + 1 for p in (". ", "! ", "? ")))
    return text[:cut].rstrip() if cut > 0 else ""


def _texts(r, tok) -> list[tuple[str, bool]]:
    """(text, capped) for every row of a rollout, EOS dropped."""
    return [(tok.decode([t for t in row if t != tok.eos_id]).strip(), capped)
            for row, capped in zip(r.as_lists(), r.truncated.tolist())]


def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int, batch: Optional[int] = None
                   ) -> list[tuple[str, bool]]:
    """(answer, capped) for every prompt: the model's greedy answer through the chat template, on the
    rollout engine in the model's dtype; prompts of similar length share a batch (None: 32 on the CPU,
    256 on a GPU, where each batch captures its CUDA graph)."""
    batch = batch or (32 if model.embed_tokens.weight.device.type == "cpu" else 256)
    ids = [tok.encode_chat([{"role": "user", "content": q}])[0] for q in prompts]
    weights = G.RolloutWeights(model)
    cfg = G.RolloutConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_id=tok.eos_id)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [None] * len(ids)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        for i, text in zip(idx, _texts(G.rollout(weights, [ids[i] for i in idx], cfg), tok)):
            out[i] = text
    return out


def free_text(model, tok, n: int, max_new_tokens: int, temperature: float = 0.8, seed: int = 0,
              batch: Optional[int] = None) -> list[tuple[str, bool]]:
    """(text, capped) for n samples of the model from BOS alone, no prompt: text in the teacher's own
    distribution, on the rollout engine in the model's dtype (top-p 0.95; batches of 32 on the CPU, 256
    on a GPU, each batch its own sampling seed)."""
    batch = batch or (32 if model.embed_tokens.weight.device.type == "cpu" else 256)
    weights = G.RolloutWeights(model)
    out = []
    for s in range(0, n, batch):
        cfg = G.RolloutConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95,
                              eos_id=tok.eos_id, seed=seed * 1_000_003 + s)
        out += _texts(G.rollout(weights, [[tok.bos_id]] * min(batch, n - s), cfg), tok)
    return out


def load_for_answers(path: str) -> torch.nn.Module:
    """A checkpoint in eval mode, on the GPU when there is one, for greedy_answers."""
    return M.load_model(path).eval().to("cuda" if torch.cuda.is_available() else "cpu")


def build_mix(parent: str, out: str, n: int = 1200, max_new_tokens: int = 96, seed: int = 0, free: int = 0,
              free_tokens: int = 128, free_temperature: float = 0.8) -> dict:
    """Write <out> (jsonl chats, each with its "kind", then `free` plain-text samples of the parent) and
    <out>.json (the counts); returns the counts."""
    t0, c0 = time.time(), TR.cpu_seconds()
    path = M.resolve_model_path(parent)
    model = load_for_answers(path)
    tok = D.checkpoint_tokenizer(path, model.args.vocab_size)
    train_docs, _ = D.python_corpus(val_fraction=0.15, seed=seed)  # the cascade's training half (its seed)
    prompts = mix_prompts(n, train_docs, seed)
    answers = greedy_answers(model, tok, [q for _, q in prompts], max_new_tokens)
    rows, dropped = [], {"heldout": 0, "empty": 0}
    counts = {}

    def keep(kind, text, capped, banned, row):  # a capped text cut to its last sentence; empty or held out: dropped
        text = _trim(text) if capped else text
        if not text or banned(text):
            dropped["heldout" if text else "empty"] += 1
            return
        rows.append({"kind": kind, "capped": capped, **row(text)})
        counts[kind] = counts.get(kind, 0) + 1
    for (kind, q), (a, capped) in zip(prompts, answers):
        keep(kind, a, capped, heldout_family,
             lambda a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    for t, capped in free_text(model, tok, free, free_tokens, free_temperature, seed) if free else ():
        keep("free", t, capped, lambda t: heldout_family(t) or _CITIES.search(t), lambda t: {"text": t})
    if not rows:
        raise ValueError(f"none of the parent's {len(prompts) + free} answers was kept ({dropped}): raise --max-new-tokens "
                         f"(capped answers are cut back to their last full sentence)")
    TR.write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    tokens = len(D.chat_tokens(out, tok))
    summary = {"parent": parent, "prompts": len(prompts), "chats": len(rows), "per_kind": counts, "dropped": dropped,
               "capped": sum(r["capped"] for r in rows), "tokens": tokens, "max_new_tokens": max_new_tokens,
               **({"free": free, "free_tokens": free_tokens, "free_temperature": free_temperature} if free else {}),
               "seed": seed, "seconds": round(time.time() - t0, 1), "cpu_seconds": round(TR.cpu_seconds() - c0, 1)}
    TR.write_json_atomic(out + ".json", summary)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parent", required=True, help="the chat parent (HF or Mistral-native folder, .gguf, smollm2)")
    p.add_argument("--out", required=True, help="the .jsonl to write (and <out>.json beside it)")
    p.add_argument("--prompts", type=int, default=1200, help="prompts generated (default 1200)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="the cap on each answer (default 96)")
    p.add_argument("--seed", type=int, default=0, help="the prompts' seed, and the corpus split's (the cascade's --seed)")
    p.add_argument("--free-text", type=int, default=0, help="plain-text samples of the parent from BOS added (default 0)")
    p.add_argument("--free-tokens", type=int, default=128, help="the cap on each free-text sample (default 128)")
    p.add_argument("--free-temperature", type=float, default=0.8, help="the free text's temperature (default 0.8)")
    a = p.parse_args(argv)
    if a.prompts < 0 or a.max_new_tokens < 1 or a.free_text < 0 or a.free_tokens < 1 or a.prompts + a.free_text < 1:
        p.error("--prompts and --free-text must be at least 0 and not both 0; --max-new-tokens and --free-tokens "
                "at least 1")
    if not a.free_temperature > 0:
        p.error(f"--free-temperature must be positive, got {a.free_temperature}: the samples are drawn, not greedy")
    code = TR.run_main(lambda: print(json.dumps(build_mix(a.parent, a.out, a.prompts, a.max_new_tokens, a.seed, a.free_text,
                                                          a.free_tokens, a.free_temperature))) or 0,
                       expected=(ValueError, FileNotFoundError, M.CheckpointError))
    sys.exit(2 if code else 0)


if __name__ == "__main__":
    main()
