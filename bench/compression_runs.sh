#!/usr/bin/env bash
# The trained rows of bench/compression.py, in order (2 cores: one job at a time, ~60 min).
# Each is a plain posttrain command; the table then reads their run directories.
#   bash bench/compression_runs.sh && python bench/compression.py $(cat runs/compress/extra_args)
# SKIP_DONE=1 leaves run directories that already hold a manifest (to continue an interrupted batch).
set -euo pipefail
R=${RUNS:-runs/compress}
SKIP_DONE=${SKIP_DONE:-0}
mkdir -p "$R"
PT=${POSTTRAIN:-posttrain}
CAL=calibration.path=data/compress/teacher_text.jsonl  # never the held-out text
TEXT=data/compress/teacher_text.jsonl
HELD=data/general/text.jsonl
# recovery: full fine-tuning in fp32 on the teacher's text, eval loss on held-out human text every 5 steps
REC="recovery.objective=pretrain recovery.data.train=$TEXT recovery.data.eval=$HELD recovery.data.max_length=256
     recovery.train.max_steps=20 recovery.train.max_tokens=1024 recovery.train.lr=1e-4 recovery.train.eval_every=5
     recovery.train.warmup_ratio=0.1 recovery.train.restore_best=false model.dtype=fp32"

job() {  # job OUT_DIR command...: run unless SKIP_DONE=1 and OUT_DIR is finished
  local out=$1; shift
  if [ "$SKIP_DONE" = 1 ] && [ -f "$out/manifest.json" ]; then echo "skip $out (done)"; return; fi
  "$@" output_dir="$out" --overwrite
}
prune() { job "$1" $PT prune --config recipes/prune_depth.yaml $CAL "${@:2}"; }

# QAT at int4 (group 64) against PTQ at the same group size
job $R/qat-int4 $PT quantize --config recipes/qat_int4.yaml

# P2 law: depth pruning at four ratios with recovery (0.1, 0.25, 0.4 fitted; 0.3 held out)
for r in 0.1 0.25 0.4 0.3; do prune $R/depth-r$r ratio=$r $REC; done
job $R/p2-fit $PT scaling-fit --config recipes/scaling_fit.yaml \
  "runs=[$R/depth-r0.1,$R/depth-r0.25,$R/depth-r0.4]" "heldout=[$R/depth-r0.3]"

# the other pruning modes, before (no recovery) and after recovery
for m in magnitude wanda wanda-2:4 width-mlp; do
  ratio="ratio=0.5"; [ "$m" = "wanda-2:4" ] && ratio="ratio=null"; [ "$m" = "width-mlp" ] && ratio="ratio=0.25"
  tag=${m/:/}
  prune $R/$tag-before method=$m $ratio model.dtype=fp32 recovery=null eval=$HELD
  prune $R/$tag-after method=$m $ratio $REC
done
prune $R/depth25-before ratio=0.25 model.dtype=fp32 recovery=null eval=$HELD

# distillation demo: half the layers, then the same tokens with KD (forward KL) or plain SFT (CE)
prune $R/depth50 ratio=0.5 model.dtype=fp32 recovery=null eval=$HELD
for base in depth50 depth25; do for w in 0 1; do
  job $R/$base-ce$w $PT distill --config recipes/distill.yaml model.name=$R/$base$([ $base = depth25 ] && echo -before) model.dtype=fp32 \
    distill.ce_weight=$w data.train=$TEXT data.kind=text data.eval=$HELD data.eval_fraction=0 data.max_length=256 \
    train.max_steps=30 train.max_tokens=1024 train.lr=1e-4 train.eval_every=10 train.save_every=null \
    "eval.tasks=[]" eval.forgetting=$HELD
done; done
echo "--extra qat-int4=$R/qat-int4 --extra depth25=$R/depth25-before --extra depth25-rec=$R/depth-r0.25 \
--extra magnitude50=$R/magnitude-before --extra magnitude50-rec=$R/magnitude-after \
--extra wanda50=$R/wanda-before --extra wanda50-rec=$R/wanda-after --extra wanda24=$R/wanda-24-before \
--extra wanda24-rec=$R/wanda-24-after --extra mlp25=$R/width-mlp-before --extra mlp25-rec=$R/width-mlp-after \
--extra depth50=$R/depth50 --extra depth50-kd=$R/depth50-ce0 --extra depth50-sft=$R/depth50-ce1 \
--p2 $R/p2-fit/p2_fit.json" > "$R/extra_args"
