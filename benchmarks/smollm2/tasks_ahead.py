# Record of how the recorded run's pruned-child task evaluations were computed ahead of the cascade
# (run from the repository root: python benchmarks/smollm2/tasks_ahead.py 14b/init).
# Compute one stage's task evaluation (math + samples) ahead of the cascade, with cascade.py's own code;
# the cascade then finds <stage>/tasks.json and skips it. Used for the recorded CPU run only.
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, "/work/wt/i11")
import cascade as C, data as D, model as M
stage = sys.argv[1]
argv = ["--parent", "smollm2", "--preset", "cpu-real", "--short-steps", "6", "--long-steps", "1", "--batch-size", "4",
        "--micro-batch-size", "4", "--eval-batches", "2", "--calib-seqs", "16", "--out", "runs/smollm2-cpu"]
cfg = C.resolved(C.config_from_argv(argv))
tok = D.Tokenizer.from_file(M.resolve_model_path("smollm2"))
ctx = C.Context(0, 1, torch.device("cpu"), None, None, tok)
r = C.stage_tasks(cfg, ctx, C.Stages(cfg, ctx), stage, f"runs/smollm2-cpu/{stage}/model")
print(stage, r["math_correct"], r["cpu_s"])
