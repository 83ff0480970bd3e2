#!/usr/bin/env bash
# The fidelity study of issue 14 ("does routing pay?") on the shapes world: every row of the
# docs/results-shapes.md comparison, pruned at the same budget, fine-tuned the same way and
# evaluated in one `aptp eval` per guidance against the same prompts and seeds, with paired
# intervals against APTP (seed 0).
#
#   bash bench/fidelity_study.sh [OUT]          # default OUT=runs/study; resumable: run it again
#
# Rows (ROWS, default all): wn (weight-norm), taylor, bk-sdm, uni-paper (the paper's Uni-Arch),
# uni (warm-started Uni-Arch), aptp, noot (no optimal transport), nodistill, noot-nodistill (the
# 2 x 2 of optimal transport x distillation with aptp). SEEDS (default "0 1 2") are the prune seeds
# of aptp and uni; the other rows use seed 0. Environment knobs, for other models or a quick check:
#   MODEL=toy BUDGET=0.78 FT_STEPS=300 LIMIT=500 GUIDANCES="3 7.5" GEN_BATCH=50
#   PRUNE_ARGS="..." FINETUNE_ARGS="..." EVAL_ARGS="..." (added to every prune / finetune / eval)
#   APTP=aptp (the command), PYTHON (default: the python next to it)
# On the 2-core CPU: about 10 min per trained prune, 10 min per mixture fine-tuning (8 x 300 steps),
# 2 min per static row, 2 min per model and guidance in eval; the whole study is several hours, so
# run it in the background (nohup) and let each session continue it.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/study}
APTP=${APTP:-aptp}
PY=${PYTHON:-$(dirname "$(command -v "$APTP")")/python}  # the interpreter aptp is installed in
MODEL=${MODEL:-toy}
BUDGET=${BUDGET:-0.78}
SEEDS=${SEEDS:-"0 1 2"}
FT_STEPS=${FT_STEPS:-300}
LIMIT=${LIMIT:-500}
GUIDANCES=${GUIDANCES:-"3 7.5"}
GEN_BATCH=${GEN_BATCH:-50}
ROWS=${ROWS:-"wn taylor bk-sdm uni-paper uni aptp noot nodistill noot-nodistill"}
read -r -a prune_extra <<< "${PRUNE_ARGS:-}"
read -r -a finetune_extra <<< "${FINETUNE_ARGS:-}"
read -r -a eval_extra <<< "${EVAL_ARGS:-}"
mkdir -p "$out"
log() { echo "[study $(date -u +%H:%M:%S)] $*"; }

flags_of() {  # the prune flags of a row
  case "$1" in
    wn) echo "--method weight-norm" ;;
    taylor) echo "--method taylor" ;;
    bk-sdm) echo "--method bk-sdm" ;;
    uni-paper) echo "--method uni-arch-paper" ;;
    uni) echo "--method uni-arch" ;;
    aptp) echo "--method aptp" ;;
    noot) echo "--method aptp --no-optimal-transport" ;;
    nodistill) echo "--method aptp --no-distill" ;;
    noot-nodistill) echo "--method aptp --no-optimal-transport --no-distill" ;;
    *) echo "unknown row $1 (see the header of $0)" >&2; exit 2 ;;
  esac
}

for row in $ROWS; do flags_of "$row" > /dev/null || exit 2; done  # every row known before anything runs
runs=()
for row in $ROWS; do
  seeds=0
  case "$row" in aptp|uni) seeds=$SEEDS ;; esac
  for seed in $seeds; do
    run="$out/$row-s$seed"
    runs+=("$run")
    read -r -a flags <<< "$(flags_of "$row")"
    if [ ! -f "$run/routing.json" ]; then
      log "prune $run"
      resume=(); [ -d "$run/checkpoints" ] && resume=(--resume)
      $APTP prune --model "$MODEL" --budget "$BUDGET" --seed "$seed" "${flags[@]}" --output "$run" --quiet \
        "${resume[@]}" "${prune_extra[@]}"
    fi
    if [ ! -f "$run/experts.json" ]; then
      log "materialize $run"
      $APTP materialize "$run" --quiet
    fi
    if [ ! -f "$run/.finetuned" ]; then
      log "finetune $run ($FT_STEPS steps per model)"
      resume=(); [ -d "$run/finetune" ] && resume=(--resume)
      $APTP finetune "$run" --steps "$FT_STEPS" --quiet "${resume[@]}" "${finetune_extra[@]}"
      touch "$run/.finetuned"
    fi
  done
done

real="$out/real"
if [ ! -f "$real/metadata.jsonl" ]; then
  log "export $LIMIT real validation images to $real"
  "$PY" -c "import sys; from aptp.data.shapes import export_image_folder; export_image_folder(sys.argv[1], 'validation', int(sys.argv[2]))" \
    "$real" "$LIMIT"
fi
reference="$out/aptp-s0"
[[ " ${runs[*]} " == *" $reference "* ]] || reference="${runs[0]}"
for g in $GUIDANCES; do
  dest="$out/eval-g$g"
  if [ ! -f "$dest/results.json" ]; then
    log "eval at guidance $g -> $dest"
    $APTP eval "$MODEL" "${runs[@]}" "$real" --reference "$reference" --limit "$LIMIT" --guidance "$g" \
      --set generate.batch_size="$GEN_BATCH" --output "$dest" --quiet "${eval_extra[@]}"
  fi
done
log "done: ${#runs[@]} runs, results in $out/eval-g*/results.json"
