"""Online DPO in miniature (PAPER.md section 8): SFT the embedded cascade's smallest child on arithmetic
answers (sft.py), train and calibrate a pairwise reward model on rule-labelled pairs (experiments/pwrm.py),
then online DPO (odpo.py) with the SFT model as the reference. Scored on held-out problems: the
PWRM-judged win rate against the SFT model, exact-answer accuracy, loop rate and length.

Run: `python experiments/odpo_demo.py` (after `python cascade.py`; finished stages are reused);
`--policy PATH --pwrm PATH` reuses trained models (a folder, a .gguf file, or `smollm2`; `--pwrm smollm2`
uses the instruct model itself as a zero-shot PWRM, only its temperature fitted); `--record FILE` copies
results.json into a record (benchmarks/odpo/).
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the mechanism files

import data as D  # noqa: E402
import model as M  # noqa: E402
import odpo as O  # noqa: E402
import sft as S  # noqa: E402
import train as TR  # noqa: E402
from experiments import pwrm as PW  # noqa: E402


@dataclass
class DemoTrainConfig(O.ODPOTrainConfig):
    """odpo.py's training flags; out_dir is the demo's root folder (sft/, pwrm/, odpo/ go here)."""
    out_dir: str = dataclasses.field(default="runs/odpo", metadata={"flags": ("--out",)})


@dataclass
class DemoConfig:
    policy: Optional[str] = None  # an SFT-ed policy checkpoint; None = SFT `child` into OUT/sft first
    child: Optional[str] = None  # the base model to SFT; None = the cascade's smallest child (runs/cascade)
    pwrm: Optional[str] = None  # a trained PWRM checkpoint (its calibration.json beside); None = train OUT/pwrm
    tokenizer: Optional[str] = None  # tekken.json; None = the checkpoint's own, else mistral-common's, truncated
    sft_steps: int = 10  # SFT of the child on math answers; short, so the SFT model still rambles and loops
    sft_lr: float = 1e-3  # SFT peak learning rate
    pwrm_steps: int = 300  # SFT of the PWRM on labelled pairs, both orders
    pwrm_lr: float = 1e-3  # PWRM peak learning rate
    pwrm_problems: int = 192  # problems whose sampled + written answers make the PWRM's training pairs
    calib_problems: int = 64  # held-out problems for the temperature and the ECE
    odpo_prompts: int = 256  # prompts the online loop samples from
    length_rule: str = "correct"  # shorter wins among two correct answers ("correct") or also two wrong ones ("equal")
    level: str = "mixed"  # data.math_problems level: "mixed" (two-digit, word problems) or "easy" (one-digit sums)
    record: Optional[str] = None  # also write the results json here (benchmarks/odpo/...)


# The smallest child; the short-context one first: it is the one Algorithm 1 carries on, and its context
# (the parent's) holds the PWRM's prompts, where a small demo's long stage may end at a few hundred tokens.
CASCADE_CHILDREN = ("runs/cascade/3b/short/model", "runs/cascade/3b/long/model")


def answer_chats(problems):
    return [[{"role": "user", "content": q["question"]}, {"role": "assistant", "content": f"The answer is {q['answer']}."}]
            for q in problems]


def stage_done(path: str) -> Optional[dict]:
    f = os.path.join(path, "done.json")
    return json.load(open(f)) if os.path.exists(f) else None


def fitting(problems: Sequence[dict], tok, max_prompt_tokens: int) -> list:
    """The problems whose chat prompt fits max_prompt_tokens (the rest are left out, and counted)."""
    return [q for q in problems
            if len(tok.encode_chat([{"role": "user", "content": q["question"]}])[0]) <= max_prompt_tokens]


def run_demo(tcfg: DemoTrainConfig, ocfg: O.ODPOConfig, dcfg: DemoConfig) -> dict:
    """The demo, stage by stage under tcfg.out_dir; finished SFT/PWRM stages are reused."""
    t_start, cpu_start, header = time.time(), TR.cpu_seconds(), TR.run_record()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = tcfg.out_dir
    sub = lambda name, **kw: dataclasses.replace(tcfg, out_dir=os.path.join(root, name), resume=True, **kw)
    log = lambda msg: print(f"[odpo demo] {msg}", flush=True)
    problems = lambda n, seed: D.math_problems(n, seed=seed, level=dcfg.level)
    splits = {"sft": problems(2048, 10), "pwrm": problems(dcfg.pwrm_problems, 11), "calib": problems(dcfg.calib_problems, 12),
              "odpo": problems(dcfg.odpo_prompts, 13), "eval": problems(ocfg.eval_prompts, 14)}

    # 1. the SFT-ed policy (Instruct = SFT then online DPO, PAPER.md section 1)
    policy_path = dcfg.policy
    if policy_path is None:
        child = dcfg.child or next((c for c in CASCADE_CHILDREN if os.path.isdir(c)), None)
        if child is None or not os.path.isdir(child):
            raise FileNotFoundError(f"no base model to SFT: run `python cascade.py` first (it writes "
                                    f"{CASCADE_CHILDREN[0]}) or pass --child PATH / --policy PATH")
        policy_path = os.path.join(root, "sft", "model")
        if stage_done(os.path.join(root, "sft")) is None:
            log(f"SFT {child} on {len(splits['sft'])} math answers for {dcfg.sft_steps} steps")
            cfg = sub("sft", steps=dcfg.sft_steps, lr=dcfg.sft_lr, warmup_steps=max(1, dcfg.sft_steps // 10),
                      seq_len=ocfg.max_prompt_tokens + 16, weight_decay=0.1)
            model = O.load_policy(child, cfg, device)
            tok = D.checkpoint_tokenizer(M.resolve_model_path(child), model.args.vocab_size, dcfg.tokenizer)
            S.run_sft(model, answer_chats(splits["sft"]), tok, cfg, S.SFTConfig(truncate=True), device=device,
                      name="sft")
            TR.write_json_atomic(os.path.join(root, "sft", "done.json"), {"child": child, "steps": dcfg.sft_steps})
    ref_cfg = dataclasses.replace(tcfg, out_dir=os.path.join(root, "odpo"), resume=True)  # a rerun resumes it
    policy = O.load_policy(policy_path, ref_cfg, device)
    reference = O.load_policy(policy_path, ref_cfg, device, train=False)
    tok = D.checkpoint_tokenizer(policy_path, policy.args.vocab_size, dcfg.tokenizer)
    for name in ("pwrm", "calib", "odpo", "eval"):  # prompts must fit max_prompt_tokens
        splits[name] = fitting(splits[name], tok, ocfg.max_prompt_tokens)

    # 2. the PWRM (experiments/pwrm.py), or a given one whose temperature is fitted here
    pwrm_path = dcfg.pwrm or os.path.join(root, "pwrm", "model")
    calib_file = os.path.join(root, "pwrm_calibration.json")
    if dcfg.pwrm is None and stage_done(os.path.join(root, "pwrm")) is None:
        log(f"PWRM pairs from {len(splits['pwrm'])} problems ({dcfg.pwrm_steps} SFT steps, both orders)")
        cfg = sub("pwrm", steps=dcfg.pwrm_steps, lr=dcfg.pwrm_lr, warmup_steps=max(1, dcfg.pwrm_steps // 10),
                  seq_len=0, weight_decay=0.1)
        info = PW.train_pwrm(policy, lambda c: O.load_policy(policy_path, c, device), tok, splits["pwrm"],
                             splits["calib"], ocfg, cfg, device=device, length_rule=dcfg.length_rule)
        TR.write_json_atomic(calib_file, info["calibration"])
        TR.write_json_atomic(os.path.join(root, "pwrm", "done.json"), info)
    pwrm = O.PairwiseRewardModel(O.load_policy(pwrm_path, ref_cfg, device, train=False), tok)
    if not os.path.exists(calib_file):  # a given PWRM: fit its temperature on rule-labelled held-out pairs
        log(f"calibrating the PWRM temperature on {len(splits['calib'])} held-out problems")
        samples = PW.sample_answers(policy, tok, splits["calib"], 2, ocfg, seed=12)
        pairs = PW.preference_pairs(splits["calib"], samples, tok, ocfg.max_new_tokens, seed=12,
                                    length_rule=dcfg.length_rule)
        TR.write_json_atomic(calib_file, pwrm.calibrate([(q["conversation"], q["a"], q["b"]) for q in pairs],
                                                        [q["label"] for q in pairs]))
    calib = json.load(open(calib_file))
    pwrm.temperature = calib["temperature"]
    log(f"PWRM calibration: {calib}")

    # 3. online DPO on the SFT-ed policy, judged by the PWRM
    prompts = [[{"role": "user", "content": q["question"]}] for q in splits["odpo"]]
    result = O.run_odpo(policy, reference, pwrm, tok, prompts, ocfg, ref_cfg, device=device,
                        eval_problems=splits["eval"], check=D.check_math_answer)
    final = result["evals"][-1]["eval"] if result["evals"] else None
    sft_eval = result["start"]
    out = {"what": "ODPO demo: PWRM-judged win rate vs the SFT model, exact-answer accuracy, loop rate",
           **header, "wall_s": time.time() - t_start, "process_cpu_s": TR.cpu_seconds() - cpu_start,
           "policy": policy_path, "pwrm": pwrm_path, "calibration": calib,
           "problems_used": {k: len(v) for k, v in splits.items()},
           "config": {"odpo": dataclasses.asdict(ocfg), "train": dataclasses.asdict(tcfg), "demo": dataclasses.asdict(dcfg)},
           "sft_model": sft_eval, "after_odpo": final, "evals": result["evals"], "odpo_steps": result["steps"]}
    TR.write_json_atomic(os.path.join(root, "results.json"), out)
    if dcfg.record:
        TR.write_json_atomic(dcfg.record, out)
    log(f"SFT model: {sft_eval}")
    log(f"after ODPO: {final}")
    return out


def main(argv=None) -> int:
    tcfg, ocfg, dcfg = TR.configs_from_args([DemoTrainConfig, O.ODPOConfig, DemoConfig], argv,
                                            description="The online-DPO demo (PAPER.md section 8).")
    print(json.dumps({"train": dataclasses.asdict(tcfg), "odpo": dataclasses.asdict(ocfg),
                      "demo": dataclasses.asdict(dcfg)}), flush=True)
    try:
        for flag, path in (("--policy", dcfg.policy), ("--child", dcfg.child), ("--pwrm", dcfg.pwrm)):
            if path is not None and not os.path.exists(M.resolve_model_path(path)):
                raise FileNotFoundError(f"{flag} {path!r} is neither a checkpoint folder nor a .gguf file: pass the "
                                        f"folder a training stage exported (OUT/model) or a fetched model's name")
        run_demo(tcfg, ocfg, dcfg)
    except (ValueError, FileNotFoundError, M.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
