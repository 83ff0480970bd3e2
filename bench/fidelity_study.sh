#!/usr/bin/env bash
# The fidelity study of issue 14 ("does routing pay?") on the shapes world: every row of the
# docs/results-shapes.md comparison, pruned at the same budget, fine-tuned the same way, each
# model's images generated once per guidance (same captions, prompt i with seed i) and all of them
# scored in one `aptp eval` per guidance, with paired intervals against APTP (seed 0).
#
#   bash bench/fidelity_study.sh [OUT]          # default OUT=runs/study; resumable: run it again
#
# Rows (ROWS, default the paper's comparison):
#   wn (weight-norm)  taylor  bk-sdm  uni-paper (the paper's Uni-Arch)  uni (warm-started Uni-Arch)
#   aptp  noot (no optimal transport)  nodistill  noot-nodistill   (the 2 x 2 with aptp)
# and the candidates of the mixture's case (issue 14, item 5), each one change to a row:
#   aptp-centred (router.similarity=centred)  aptp-snr (prune.snr_gamma=5)
#   aptp-per-expert (prune.resource_per=expert: every expert at the budget, no capacity shifted)
#   aptp-cd / uni-cd (finetune.caption_dropout=0.1; the prune of aptp / uni is reused)
#   wn-cd / taylor-cd / bk-sdm-cd / uni-paper-cd (the static baselines with the same caption
#     dropout, each pruned afresh: the comparison with aptp-cd at the same fine-tuning)
#   aptp-split (finetune.steps_mode=split: the mixture's fine-tuning costs one static model's)
#   aptp-big / uni-big (fine-tuned on a BIG-sample train split, default 125,000: every expert's
#     routed share then holds about the 9,600 distinct samples of its 300 x 32 steps; the prune
#     of aptp / uni is reused, so only what the fine-tuning sees changes)
#   uni-medium (the uni prune of the same seed fine-tuned on the medium tier's training prompts
#     alone, OUT/train-medium, as a medium expert is: does the Uni-Arch architecture keep its
#     medium-tier lead as a specialist? if so the medium experts' architecture is what they lack)
# SEEDS (default "0 1 2") are the prune seeds of every row but wn, wn-cd (weight-norm's prune reads no data:
# it is the same at every seed, and finetune.seed is fixed); a row that reuses a prune (aptp-cd,
# uni-medium, ...) reuses the one of its own seed, pruned (not fine-tuned) first when that row was
# never run. SEEDS=0 gives the one-seed study.
# Images go to OUT/gen/ROW-sSEED-gG (and OUT/gen/teacher-gG), so an interrupted study loses no
# finished model, and the eval (OUT/eval-gG, rerun each time) scores whatever rows are done. The
# eval also writes each model's per-image features (OUT/eval-gG/embeddings/NAME-gG.safetensors,
# ~0.5 MB); copied to STORED (default bench/study-embeddings, in git) they stand in for images a
# later machine no longer has, so new rows are paired with old ones without regenerating them:
#   ROWS="noot" SEEDS=0 ALSO="aptp-s0 aptp-s1" bash bench/fidelity_study.sh   # aptp-s* from STORED
# Environment knobs, for other models or a quick check:
#   MODEL=toy BUDGET=0.78 FT_STEPS=300 LIMIT=500 GUIDANCES="3 7.5" GEN_BATCH=50 EVAL=1 TEACHER=1
#   CACHE_LATENTS=1 BIG=125000 STORED=bench/study-embeddings ALSO=""
#   PRUNE_ARGS="..." FINETUNE_ARGS="..." EVAL_ARGS="..." (added to every prune / finetune / eval)
#   APTP=aptp (the command), PYTHON (default: the python next to it)
# Times on the 2-core CPU (toy U-Net) depend on the CPU: on 2026-12-01's a mixture row (prune, fine-
# tuning of 8 x 300 steps, images) took about 36 min with 2 threads; on an AVX2-only EPYC (Zen 3) a
# pruning step takes 3.3 s instead of 0.7 s, so a mixture row is hours. Run it in the background
# (nohup), keep OUT outside a work tree that may be laid anew, and let each session continue it.
# CACHE_LATENTS=1 (default) adds data.cache_latents=true to every trained prune and fine-tuning:
# the VAE encodes the training set once (tested equal to the per-step encoder to rounding).
# Two instances on different rows (the second with TEACHER=0 EVAL=0) need OMP_NUM_THREADS=1 each:
# one 2-thread job beside another process slowed its linear algebra up to 1000x (OpenMP waits);
# two 1-thread fine-tunings gave 1.2x the throughput of one 2-thread job, two prunes none.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/study}
APTP=${APTP:-aptp}
PY=${PYTHON:-$(dirname "$(command -v "$APTP")")/python}  # the interpreter aptp is installed in
MODEL=${MODEL:-toy}
BUDGET=${BUDGET:-0.78}
SEEDS=${SEEDS:-"0 1 2"}
FT_STEPS=${FT_STEPS:-300}
BIG=${BIG:-125000}
LIMIT=${LIMIT:-500}
GUIDANCES=${GUIDANCES:-"3 7.5"}
GEN_BATCH=${GEN_BATCH:-50}
EVAL=${EVAL:-1}
CACHE_LATENTS=${CACHE_LATENTS:-1}
TEACHER=${TEACHER:-1}  # 0: no teacher images (a second instance on other rows, beside a first one)
ROWS=${ROWS:-"wn taylor bk-sdm uni-paper uni aptp noot nodistill noot-nodistill"}
# per-image features of earlier rows (see the eval below); those of another prompt count than 500
# live in bench/study-embeddings/nLIMIT (n2000/), since the eval refuses a file of another --limit
STORED=${STORED:-bench/study-embeddings$([ "$LIMIT" = 500 ] || echo "/n$LIMIT")}
ALSO=${ALSO:-}  # more NAME-sSEED (or teacher) to score beside ROWS, from their images or STORED
read -r -a prune_extra <<< "${PRUNE_ARGS:-}"
read -r -a finetune_extra <<< "${FINETUNE_ARGS:-}"
if [ "$CACHE_LATENTS" = 1 ]; then
  prune_extra+=(--set data.cache_latents=true)
  finetune_extra+=(--set data.cache_latents=true)
fi
read -r -a eval_extra <<< "${EVAL_ARGS:-}"
mkdir -p "$out/gen"
log() { echo "[study $(date -u +%H:%M:%S)] $*"; }

spec() {  # "BASE|PRUNE FLAGS|FINETUNE FLAGS" of a row; BASE: the row whose prune it reuses
  case "$1" in
    wn) echo "|--method weight-norm|" ;;
    taylor) echo "|--method taylor|" ;;
    bk-sdm) echo "|--method bk-sdm|" ;;
    uni-paper) echo "|--method uni-arch-paper --set prune.code_lr_scale=4 --set prune.lambda_res=20|" ;;
    uni) echo "|--method uni-arch|" ;;
    aptp) echo "|--method aptp|" ;;
    noot) echo "|--method aptp --no-optimal-transport|" ;;
    nodistill) echo "|--method aptp --no-distill|" ;;
    noot-nodistill) echo "|--method aptp --no-optimal-transport --no-distill|" ;;
    aptp-centred) echo "|--method aptp --set router.similarity=centred|" ;;
    aptp-snr) echo "|--method aptp --set prune.snr_gamma=5|" ;;
    aptp-per-expert) echo "|--method aptp --set prune.resource_per=expert|" ;;
    aptp-cd) echo "aptp||--set finetune.caption_dropout=0.1" ;;
    uni-cd) echo "uni||--set finetune.caption_dropout=0.1" ;;
    wn-cd) echo "|--method weight-norm|--set finetune.caption_dropout=0.1" ;;
    taylor-cd) echo "|--method taylor|--set finetune.caption_dropout=0.1" ;;
    bk-sdm-cd) echo "|--method bk-sdm|--set finetune.caption_dropout=0.1" ;;
    uni-paper-cd) echo "|--method uni-arch-paper --set prune.code_lr_scale=4 --set prune.lambda_res=20|--set finetune.caption_dropout=0.1" ;;
    aptp-split) echo "aptp||--set finetune.steps_mode=split" ;;
    aptp-big) echo "aptp||--set data.max_samples=$BIG" ;;
    uni-big) echo "uni||--set data.max_samples=$BIG" ;;
    uni-medium) echo "uni||--set data.name=$out/train-medium" ;;
    *) echo "unknown row $1 (see the header of $0)" >&2; return 2 ;;
  esac
}

lines() { [ -f "$1" ] && wc -l < "$1" || echo 0; }

generate() {  # generate RUN NAME [extra flags]: LIMIT images per guidance into OUT/gen/NAME-gG
  local run=$1 name=$2; shift 2
  for g in $GUIDANCES; do
    local dest="$out/gen/$name-g$g"
    if [ "$(lines "$dest/manifest.jsonl")" -ne "$LIMIT" ]; then
      log "generate $name at guidance $g"
      $APTP generate "$run" --prompts "$out/prompts.txt" --output "$dest" --guidance "$g" \
        --batch-size "$GEN_BATCH" --overwrite --quiet "$@" > /dev/null
    fi
  done
}

for row in $ROWS; do spec "$row" > /dev/null || exit 2; done  # every row known before anything runs

real="$out/real"
if [ ! -f "$real/metadata.jsonl" ]; then
  log "export $LIMIT real validation images to $real"
  "$PY" -c "import sys; from aptp.data.shapes_world import export_image_folder; export_image_folder(sys.argv[1], 'validation', int(sys.argv[2]))" \
    "$real" "$LIMIT"
fi
[ -f "$out/prompts.txt" ] || "$PY" -c "import json, sys; print(''.join(json.loads(l)['text'] + '\n' for l in open(sys.argv[1]) if l.strip()), end='')" \
  "$real/metadata.jsonl" > "$out/prompts.txt"

if [[ " $ROWS " == *" uni-medium "* ]] && [ ! -f "$out/train-medium/metadata.jsonl" ]; then
  log "export the medium tier of the train split to $out/train-medium"
  "$PY" -c "import sys; from aptp.data.shapes_world import export_image_folder; export_image_folder(sys.argv[1], 'train', 20000, tiers=['medium'])" \
    "$out/train-medium"
fi

prepare() {  # prepare RUN SEED [prune flags]: prune (resumable) and materialize RUN unless done
  local run=$1 seed=$2; shift 2
  if [ ! -f "$run/routing.json" ]; then
    log "prune $run"
    local resume=(); [ -d "$run/checkpoints" ] && resume=(--resume)
    $APTP prune --model "$MODEL" --budget "$BUDGET" --seed "$seed" "$@" --output "$run" --quiet \
      "${resume[@]}" "${prune_extra[@]}"
  fi
  if [ ! -f "$run/experts.json" ]; then
    log "materialize $run"
    $APTP materialize "$run" --quiet
  fi
}

names=()
for row in $ROWS; do
  IFS='|' read -r base pflags fflags <<< "$(spec "$row")"
  seeds=$SEEDS
  case "$row" in wn|wn-*) seeds=0 ;; esac  # weight-norm's prune reads no data
  for seed in $seeds; do
    run="$out/$row-s$seed"
    names+=("$row-s$seed")
    read -r -a flags <<< "$pflags"
    read -r -a ft <<< "$fflags"
    if [ -n "$base" ] && [ ! -f "$run/experts.json" ]; then
      src="$out/$base-s$seed"
      # the base row's prune, made here when the base row was never run (it is not fine-tuned or sampled)
      IFS='|' read -r _ bflags _ <<< "$(spec "$base")"
      read -r -a bf <<< "$bflags"
      prepare "$src" "$seed" "${bf[@]}"
      log "copy the pruned and materialized $src to $run"
      rm -rf "$run"; mkdir -p "$run"
      for f in "$src"/*; do
        case "$(basename "$f")" in finetuned|finetune|checkpoints|samples) ;; *) cp -a "$f" "$run/" ;; esac
      done
    fi
    prepare "$run" "$seed" "${flags[@]}"
    if [ ! -f "$run/.finetuned" ]; then
      log "finetune $run ($FT_STEPS steps) ${ft[*]}"
      resume=(); [ -d "$run/finetune" ] && resume=(--resume)
      # caption dropout 0 unless the row sets it: the study's rows were fine-tuned without it, before
      # the built-in default became 0.1 (a later --set wins, so a row's own flag replaces this one)
      $APTP finetune "$run" --steps "$FT_STEPS" --quiet "${resume[@]}" --set finetune.caption_dropout=0 \
        "${ft[@]}" "${finetune_extra[@]}"
      touch "$run/.finetuned"
    fi
    generate "$run" "$row-s$seed"
    [ "$TEACHER" = 0 ] || [ -d "$out/gen/teacher-g${GUIDANCES%% *}" ] || generate "$run" teacher --full
  done
done
[ "$TEACHER" = 0 ] || generate "$out/${names[0]}" teacher --full

[ "$EVAL" = 1 ] || { log "done (EVAL=0: no eval)"; exit 0; }
# a model whose images are gone (a machine laid anew) is scored from its saved per-image features,
# STORED/NAME-gG.safetensors (`aptp eval --save-embeddings`, committed), and still paired
stored_target() {  # $1 = NAME-gG: its image folder, else its stored features, else nothing
  if [ -d "$out/gen/$1" ]; then echo "$out/gen/$1"
  elif [ -f "$STORED/$1.safetensors" ]; then echo "$STORED/$1.safetensors"
  fi
}
for n in $ALSO; do names+=("$n"); done
for g in $GUIDANCES; do
  targets=() ref_target=
  for n in teacher "${names[@]}"; do
    t=$(stored_target "$n-g$g")
    if [ -z "$t" ]; then
      [ "$n" = teacher ] || log "no images or stored features of $n at guidance $g: left out"
      continue
    fi
    [[ " ${targets[*]} " == *" $t "* ]] || targets+=("$t")
    if [ "$n" = aptp-s0 ]; then ref_target=$t; fi
  done
  [ -n "$ref_target" ] || ref_target=${targets[0]}
  log "eval at guidance $g: ${#targets[@]} targets and the real images -> $out/eval-g$g"
  $APTP eval "${targets[@]}" "$real" --reference "$ref_target" --limit "$LIMIT" \
    --output "$out/eval-g$g" --overwrite --save-embeddings --quiet "${eval_extra[@]}"
done
log "done: ${#names[@]} runs, results in $out/eval-g*/results.json"
