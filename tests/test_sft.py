"""sft.py: the chat mask and batching, the loss against the equation on full logits, where the KL-SFT
gradient lands, a CPU micro-run that learns a held-out task, bad input (jsonl lines, long chats, a teacher
with another vocabulary), the FP8 scaling logic (CPU) and FP8 linear (GPU), loop detection, --chat."""

import dataclasses
import io
import json
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data as D  # noqa: E402
import distill as DI  # noqa: E402
import model as M  # noqa: E402
import sft as S  # noqa: E402
import train as T  # noqa: E402
from experiments import evals as E  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 1280  # the shipped Tekken truncated to 1000 specials + 280 ranks
TINY = M.ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=V,
                   rope_theta=1e4, max_seq_len=256)


def make(args=TINY, seed=0):
    m = M.Transformer(args)
    m.init_weights(seed)
    return m


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tk") / "tekken.json"
    return D.Tokenizer.from_file(D.tekken_with_think(D.default_tekken_path(), str(path), V), vocab_size=V)


CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6 * 7?"},
     {"role": "assistant", "thinking": "6*7 = 42", "content": "42"},
     {"role": "user", "content": "And 6 * 8?"}, {"role": "assistant", "content": "48"}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven is prime."}],
]


def test_chat_mask_covers_exactly_the_assistant_tokens(tok):
    examples, stats = S.encode_conversations(CHATS, tok, max_tokens=200)
    ids, mask = S.chat_batch(examples, tok.pad_id)
    assert ids.shape == mask.shape == (2, max(len(i) for i, _ in examples))
    inputs, targets = S.shift(ids, mask)
    trained = [tok.decode(row[row != -100], special="keep") for row in targets]
    # exactly what the assistant produces: trace markers, trace, answers and each </s>; nothing else
    assert trained[0] == "[THINK]6*7 = 42[/THINK]42</s>48</s>"
    assert trained[1] == "Seven is prime.</s>"
    # the target at t is ids[t + 1]; padding (row 1's tail) is never a target
    valid = targets != -100
    assert torch.equal(targets[valid], ids[:, 1:][valid])
    assert not valid[1, len(examples[1][0]) - 1:].any()
    assert stats["assistant_targets"] == int(valid.sum())


def test_chat_loader_ranks_split_the_single_process_rows(tok):
    examples, _ = S.encode_conversations(CHATS * 5, tok, 64)
    one = S.ChatLoader(examples, 4, 63, tok.pad_id, seed=3)
    ranks = [S.ChatLoader(examples, 2, 63, tok.pad_id, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for i in range(4):  # global row k = (i * world + rank) * B + j is the same row in both layouts
        x1, y1 = one.batch(i)
        x2 = torch.cat([ranks[0].batch(2 * i)[0], ranks[1].batch(2 * i)[0], ranks[0].batch(2 * i + 1)[0],
                        ranks[1].batch(2 * i + 1)[0]])
        assert torch.equal(torch.cat([one.batch(2 * i)[0], one.batch(2 * i + 1)[0]]), x2)
        assert x1.shape == y1.shape == (4, 63)
    # an epoch reads every example once: rows 0..9 are a permutation of the 10 examples
    perm = one._perm(0)
    assert sorted(perm.tolist()) == list(range(10))


def _masked_reference(student, teacher, ids, mask, temperature):
    x, y = S.shift(ids, mask)
    valid = (y != -100).flatten()
    hs = student(x, return_hidden=True).flatten(0, 1)
    if teacher is None:
        return DI.ce_reference(hs, student.lm_head.weight, y.flatten())
    ht = teacher(x, return_hidden=True).flatten(0, 1)
    return DI.kl_reference(hs, student.lm_head.weight, ht, teacher.lm_head.weight, mask=valid,
                           temperature=temperature)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_sft_loss_equals_the_masked_equation(tok, with_teacher):
    student = make()
    teacher = make(dataclasses.replace(TINY, dim=96, n_layers=3, hidden_dim=192), seed=1) if with_teacher else None
    ids, mask = S.chat_batch(S.encode_conversations(CHATS, tok, 200)[0], tok.pad_id)
    got = S.sft_loss(student, ids, mask, teacher, temperature=2.0, chunk_size=7)
    want = _masked_reference(student, teacher, ids, mask, 2.0)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    # averaged over the assistant targets: the same chats with twice the padding give the same loss
    ids2, mask2 = S.chat_batch(S.encode_conversations(CHATS, tok, 200)[0], tok.pad_id, ids.shape[1] + 9)
    torch.testing.assert_close(S.sft_loss(student, ids2, mask2, teacher, temperature=2.0), got, rtol=1e-5, atol=1e-6)


def test_sft_loss_in_bf16_autocast_stays_close_to_fp32(tok):
    """bf16 autocast (train.py's unsharded bf16): loss within 2% and gradients pointing the same way."""
    student, teacher = make(), make(dataclasses.replace(TINY, dim=96), seed=1)
    ids, mask = S.chat_batch(S.encode_conversations(CHATS, tok, 200)[0], tok.pad_id)
    for t in (None, teacher):
        grads = []
        for amp in (False, True):
            student.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = S.sft_loss(student, ids, mask, t)
            loss.backward()
            grads.append((float(loss.detach()), torch.cat([p.grad.flatten() for p in student.parameters()])))
        (ref, g32), (got, g16) = grads
        assert abs(got - ref) <= 0.02 * abs(ref) + 1e-3
        assert F.cosine_similarity(g32, g16, dim=0) > 0.99


def test_kl_sft_gradient_touches_only_masked_positions(tok):
    student, teacher = make(), make(seed=3)
    ids, mask = S.chat_batch(S.encode_conversations(CHATS, tok, 200)[0], tok.pad_id)
    keep = {}

    def hook(mod, inp, out):
        out.retain_grad()
        keep["h"] = out

    handle = student.norm.register_forward_hook(hook)
    S.sft_loss(student, ids, mask, teacher).backward()
    handle.remove()
    g = keep["h"].grad.abs().sum(-1)  # [B, T-1]: d loss / d final hidden per position
    trained = mask[:, 1:] == 1
    assert (g[~trained] == 0).all()
    assert (g[trained] > 0).all()
    # the inputs that are never a position of an assistant target only matter through attention: the
    # embedding rows of pad tokens (never read by an earlier position) get no gradient
    assert student.embed_tokens.weight.grad[tok.pad_id].abs().sum() == 0 or tok.pad_id in ids[mask == 1]


def parity_chats(numbers):
    return [[{"role": "user", "content": f"Parity of {n}"},
             {"role": "assistant", "content": "even" if n % 2 == 0 else "odd"}] for n in numbers]


def test_micro_run_raises_held_out_accuracy(tok, tmp_path):
    rng = random.Random(0)
    numbers = rng.sample(range(100, 10000), 560)
    train_n, held = numbers[:500], numbers[500:]
    items = [{"question": f"Parity of {n}", "answer": "even" if n % 2 == 0 else "odd"} for n in held]
    student = make()
    before = E.answer_eval(student, tok, items, max_new_tokens=4)
    cfg = T.TrainConfig(out_dir=str(tmp_path / "run"), steps=60, batch_size=32, micro_batch_size=32, seq_len=24,
                        lr=1e-2, warmup_steps=5, dtype="fp32", log_every=0, export=False)
    out = S.run_sft(student, parity_chats(train_n), tok, cfg, S.SFTConfig(), device="cpu")
    after = E.answer_eval(student, tok, items, max_new_tokens=4)
    assert out["data"]["examples"] == 500 and out["history"][-1]["loss"] < out["history"][0]["loss"]
    assert before["accuracy"] < 0.2
    assert after["accuracy"] >= 0.9, after


# -- bad input ------------------------------------------------------------------------------------


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"messages": CHATS[1]})


def test_malformed_jsonl_lines_named_stop_or_skip(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [GOOD, "{not json", GOOD, json.dumps({"msgs": []}), "",
                                              json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
                                              json.dumps({"messages": [{"role": "user", "content": "only a question"}]})])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: not valid JSON.*--on-bad-line skip"):
        S.read_conversations(path, "stop", tok)
    convs, bad = S.read_conversations(path, "skip", tok)
    assert len(convs) == 2
    assert [n for n, _ in bad] == [2, 4, 6, 7]
    assert "messages" in bad[1][1] and "robot" in bad[2][1] and "no assistant" in bad[3][1]
    # the CLI: one error line naming the line, non-zero exit
    ckpt = str(tmp_path / "student")
    M.save_model(make(), ckpt)
    rc = S.main(["--data", path, "--student", ckpt, "--tokenizer", tok.path, "--out", str(tmp_path / "o"),
                 "--steps", "1", "--dtype", "fp32"])
    assert rc == 1 and not os.path.exists(tmp_path / "o")


def test_conversation_longer_than_the_context(tok, tmp_path):
    long = [{"role": "user", "content": "q " * 40}, {"role": "assistant", "content": "a " * 40 + "end"}]
    with pytest.raises(ValueError, match=r"conversation 1 has \d+ tokens, longer than the context of 33.*--truncate"):
        S.encode_conversations([CHATS[1], long], tok, 33)
    examples, stats = S.encode_conversations([CHATS[1], long], tok, 33, truncate=True)
    assert stats["truncated"] == 1 and all(len(i) <= 33 for i, _ in examples)
    # a conversation whose assistant part starts past the cut has nothing left to train on: dropped, counted
    late = [{"role": "user", "content": "q " * 60}, {"role": "assistant", "content": "a"}]
    examples, stats = S.encode_conversations([CHATS[1], late], tok, 33, truncate=True)
    assert stats["dropped"] == 1 and stats["examples"] == 1
    cfg = T.TrainConfig(out_dir=str(tmp_path / "r"), steps=1, batch_size=1, micro_batch_size=1, seq_len=512,
                        dtype="fp32", export=False)
    with pytest.raises(ValueError, match="exceeds the student's context max_seq_len 256"):
        S.run_sft(make(), CHATS, tok, cfg, S.SFTConfig(), device="cpu")


def test_teacher_with_another_vocabulary(tok, tmp_path):
    ids, mask = S.chat_batch(S.encode_conversations(CHATS, tok, 200)[0], tok.pad_id)
    other = make(dataclasses.replace(TINY, vocab_size=V + 64))
    with pytest.raises(ValueError, match="vocabulary mismatch: the student has 1280 tokens, the teacher 1344"):
        S.sft_loss(make(), ids, mask, other)
    cfg = T.TrainConfig(out_dir=str(tmp_path / "r"), steps=1, batch_size=2, micro_batch_size=2, seq_len=64,
                        dtype="fp32", export=False)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        S.run_sft(make(), CHATS, tok, cfg, S.SFTConfig(), other, device="cpu")
    assert not os.path.exists(tmp_path / "r")


# -- FP8 ------------------------------------------------------------------------------------------


def test_fp8_scaling_logic_on_cpu():
    x = torch.randn(64, 48) * 3.0
    x[5, 7] = -50.0  # the amax
    x8, inv = S.quantize_e4m3(x)
    assert x8.dtype == torch.float8_e4m3fn
    assert x8.float().abs().max() == 448.0 and x8[5, 7].float() == -448.0  # amax lands on the top of the range
    torch.testing.assert_close(inv, torch.tensor(50.0 / 448.0))
    back = x8.float() * inv
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals; tiny values sit on the subnormal grid
    err = (back - x).abs()
    assert (err <= x.abs() * 2**-4 + inv * 2**-9 + 1e-7).all()
    # no overflow to NaN when rounding the max up, and an all-zero tensor gets scale 1
    z8, zinv = S.quantize_e4m3(torch.zeros(4, 4))
    assert zinv == 1.0 and (z8.float() == 0).all()
    assert torch.isfinite(S.quantize_e4m3(torch.full((3,), 1e30))[0].float()).all()
    # the reference FP8 matmul stays within a few percent of fp32 on well-scaled inputs
    a, w = torch.randn(32, 64), torch.randn(16, 64)
    ref = a @ w.t()
    assert ((S.fp8_linear_reference(a, w) - ref).norm() / ref.norm()) < 0.06


def test_fp8_falls_back_to_bf16_on_cpu_with_a_message(capsys):
    m = make()
    assert S.convert_to_fp8(m, "cpu") == 0
    assert "--fp8 requested but unavailable" in capsys.readouterr().err
    assert all(type(mod) is not S.FP8Linear for mod in m.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not S.fp8_supported("cuda")[0],
                    reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)")
def test_fp8_linear_matches_bf16_on_gpu():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512, bias=False).cuda()  # fp32 master weight
    x = torch.randn(4, 32, 256, device="cuda", requires_grad=True)
    ref = F.linear(x.bfloat16(), lin.weight.bfloat16()).float()
    lin.__class__ = S.FP8Linear
    y = lin(x)
    assert y.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    torch.testing.assert_close(y.float(), S.fp8_linear_reference(x.detach().reshape(-1, 256).bfloat16(),
                                                                 lin.weight.detach().bfloat16()).reshape(4, 32, 512),
                               rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and x.grad is not None and torch.isfinite(lin.weight.grad).all()


# -- generation, loops, chat ----------------------------------------------------------------------


def test_chat_mode_talks_to_a_checkpoint(tok, tmp_path):
    ckpt = str(tmp_path / "m")
    M.save_model(make(), ckpt)
    run = S.SFTRun(tokenizer=tok.path, max_new_tokens=5, chat_temperature=0.0)
    out = io.StringIO()
    S.chat(ckpt, run, stdin=io.StringIO("Hello\nAnd again\n\n"), stdout=out)
    text = out.getvalue()
    assert text.count("model> ") == 2 and "you> " in text
    assert S.main(["--chat", str(tmp_path / "missing")]) == 1


def test_math_traces_are_correct_worked_steps():
    for it in D.math_problems(300, seed=5):
        trace = D.math_trace(it["question"], it["answer"])
        assert D.check_math_answer(trace, it["answer"])  # the trace's last number is the answer
    with pytest.raises(ValueError, match="gives 13, the answer is 12"):
        D.math_trace("What is 6 + 7?", "12")
