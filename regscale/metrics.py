"""Names of the training metrics in metrics.jsonl and MLflow: one place for the loop that logs
them and the tools that read them (status, compare, benchmarks)."""

LOSS = "loss"  # the REG loss, mean over the applied steps since the last log line
LOSS_IMG = "loss/img"
LOSS_PROJ = "loss/proj"
LOSS_CLS = "loss/cls"
GRAD_NORM = "grad_norm"  # before clipping, of the newest applied step
LR = "lr"
IMAGES_PER_S = "images_per_s"
STEP_S = "step_s"
DATA_WAIT_S = "data_wait_s"  # per step, mean over ranks
NONFINITE_TOTAL = "nonfinite_total"  # steps skipped for an inf/nan gradient, fp16 overflows included
LOSS_SCALE = "loss_scale"  # fp16: the scale the newest step's gradients were computed with
IMAGES = "images"
MFU = "mfu"
FIRST_STEP_S = "time/first_step_s"  # process start to the end of its first step
FIRST_STEP_DURATION_S = "time/first_step_duration_s"  # the first step alone (it compiles)
CKPT_STALL_S = "ckpt/stall_s"  # what the loop waited for one checkpoint, all of it
CKPT_SAVE_S = "ckpt/save_s"  # from the save's start to its publication
CKPT_ASYNC = "ckpt/async"
CKPT_COPY_WAIT_S = "ckpt/copy_wait_s"  # of the stall, the wait for an async save's copy (inside a step)
CKPT_EVERY_STEPS = "ckpt/every_steps"  # the checkpoint interval in force (train.ckpt_every, or auto's)
STRAGGLER_LAG = "ranks/lag"  # the slowest rank's step time over the other ranks' median, per log window
STRAGGLER_RANK = "ranks/slowest"  # which rank that is
GOODPUT = "goodput/ratio"  # steps that count / allocated GPU time, of the lineage (regscale.launch.goodput)
GPU_HOURS = "gpu_hours"  # of the whole lineage, on the MLflow run
EVAL_PREFIX = "eval/"  # evaluation metrics mirrored on the training run: eval/fid, eval/sfid, ...
