#!/usr/bin/env bash
# The trained rows of bench/compression.py, in order (2 cores: one job at a time, ~50 min).
# Each is a plain posttrain command; the table then reads their run directories.
#   bash bench/compression_runs.sh && python bench/compression.py $(cat runs/compress/extra_args)
set -euo pipefail
R=${RUNS:-runs/compress}
mkdir -p "$R"
PT=${POSTTRAIN:-posttrain}
CAL=calibration.path=data/compress/teacher_text.jsonl  # never the held-out text
TEXT=data/compress/teacher_text.jsonl
HELD=data/general/text.jsonl
# recovery: full fine-tuning in fp32 on the teacher's text, eval loss on held-out human text every 5 steps
REC="recovery.objective=pretrain recovery.data.train=$TEXT recovery.data.eval=$HELD recovery.data.max_length=256
     recovery.train.max_steps=20 recovery.train.max_tokens=1024 recovery.train.lr=1e-4 recovery.train.eval_every=5
     recovery.train.warmup_ratio=0.1 recovery.train.restore_best=false model.dtype=fp32"

# QAT at int4 (group 64) against PTQ at the same group size
$PT quantize --config recipes/qat_int4.yaml output_dir=$R/qat-int4 --overwrite

# P2 law: depth pruning at four ratios with recovery (0.1, 0.25, 0.4 fitted; 0.3 held out)
for r in 0.1 0.25 0.4 0.3; do
  $PT prune --config recipes/prune_depth.yaml $CAL ratio=$r output_dir=$R/depth-r$r $REC --overwrite
done
$PT scaling-fit --config recipes/scaling_fit.yaml output_dir=$R/p2-fit \
  "runs=[$R/depth-r0.1,$R/depth-r0.25,$R/depth-r0.4]" "heldout=[$R/depth-r0.3]" --overwrite

# the other pruning modes, before (no recovery) and after recovery
for m in magnitude wanda wanda-2:4 width-mlp; do
  ratio="ratio=0.5"; [ "$m" = "wanda-2:4" ] && ratio=""; [ "$m" = "width-mlp" ] && ratio="ratio=0.25"
  tag=${m/:/}
  $PT prune --config recipes/prune_depth.yaml $CAL method=$m $ratio output_dir=$R/$tag-before model.dtype=fp32 \
    recovery=null eval=$HELD --overwrite
  $PT prune --config recipes/prune_depth.yaml $CAL method=$m $ratio output_dir=$R/$tag-after $REC --overwrite
done
$PT prune --config recipes/prune_depth.yaml $CAL ratio=0.25 output_dir=$R/depth25-before model.dtype=fp32 \
  recovery=null eval=$HELD --overwrite

# distillation demo: half the layers, then the same tokens with KD (forward KL) or plain SFT (CE)
$PT prune --config recipes/prune_depth.yaml $CAL ratio=0.5 output_dir=$R/depth50 model.dtype=fp32 recovery=null \
  eval=$HELD --overwrite
for w in 0 1; do
  $PT distill --config recipes/distill.yaml model.name=$R/depth50 model.dtype=fp32 output_dir=$R/depth50-ce$w \
    distill.ce_weight=$w data.train=$TEXT data.kind=text data.eval=$HELD data.eval_fraction=0 data.max_length=256 \
    train.max_steps=30 train.max_tokens=1024 train.lr=1e-4 train.eval_every=10 train.save_every=null \
    eval.tasks=[] eval.forgetting=$HELD --overwrite
done
echo "--extra qat-int4=$R/qat-int4 --extra depth25=$R/depth25-before --extra depth25-rec=$R/depth-r0.25 \
--extra magnitude50=$R/magnitude-before --extra magnitude50-rec=$R/magnitude-after \
--extra wanda50=$R/wanda-before --extra wanda50-rec=$R/wanda-after --extra wanda24=$R/wanda-24-before \
--extra wanda24-rec=$R/wanda-24-after --extra mlp25=$R/width-mlp-before --extra mlp25-rec=$R/width-mlp-after \
--extra depth50=$R/depth50 --extra depth50-kd=$R/depth50-ce0 --extra depth50-sft=$R/depth50-ce1 \
--p2 $R/p2-fit/p2_fit.json" > "$R/extra_args"
