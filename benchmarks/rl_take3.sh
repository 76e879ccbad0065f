#!/bin/bash
# Issue 14, third grid call (benchmarks/RL.md "Take two: the answer"): on 2 x H200 (device kind nvidia-h200-x2),
# two grids at once from the carried pretrained policy (workdir/carry/pretrained.part_*) and the 35 finished runs
# (workdir/carry/results.jsonl.gz):
#   main: the arms and the rate the first two calls lacked (cispo_1.28, grpo, lr 5e-5), 6 workers;
#   clip: the three first arms at lr 3e-4 and mu 16, where DAPO clips more than 5% of tokens, 2 workers.
# Workers are spread over the GPUs (m1jax.rl.grid.worker_envs). Outputs: $OUT/{main,clip}_{results.jsonl.gz,summary.md,log.txt}.
# Usage: OUT=/tmp/out bash benchmarks/rl_take3.sh [deadline_s] [stop_s]
set -o pipefail
export PYTHONUNBUFFERED=1
DEADLINE=${1:-495}; STOP=${2:-530}
MODEL="--layers=8 --period=2 --hidden=256 --heads=4 --head_dim=64 --experts=8 --ffn=128 --compute_dtype=bfloat16"
TASK="--task=column_addition --min_digits=3 --max_digits=8 --forget_prob=0.7"
COMMON="--prompts=64 --group_size=16 --rl_steps=120 --eval_every=10 --eval_problems=256 --eval_samples=16 \
  --init_checkpoint=workdir/carry/pretrained --nodiagnose --deadline_s=$DEADLINE --stop_s=$STOP"
python -m experiments.rl_grid --out=/tmp/grid_main --workdir=workdir/rl_main $MODEL $TASK $COMMON \
  --arms=dapo,cispo_5,cispo_masked,cispo_1.28,grpo --lrs=5e-5,1e-4,3e-4 --sweep_mu=8 --mus=8,1,16 --seeds=3 \
  --workers=6 --previous=workdir/carry/results.jsonl.gz > $OUT/main_log.txt 2>&1 &
python -m experiments.rl_grid --out=/tmp/grid_clip --workdir=workdir/rl_clip $MODEL $TASK $COMMON \
  --arms=dapo@0.0003,cispo_5@0.0003,cispo_masked@0.0003 --sweep_mu=16 --mus=16 --seeds=3 \
  --workers=2 > $OUT/clip_log.txt 2>&1 &
wait
for g in main clip; do
  for f in results.jsonl.gz summary.md; do cp /tmp/grid_$g/$f $OUT/${g}_$f 2>/dev/null; done
  tail -5 $OUT/${g}_log.txt
done
