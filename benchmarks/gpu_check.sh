#!/usr/bin/env bash
# One command, every GPU figure of the distill step in one folder (< 8 min on one H100/H200):
#
#   bash benchmarks/gpu_check.sh OUTDIR          # on a CUDA machine (OUTDIR default: $OUT, else ./gpu-check)
#   bash benchmarks/gpu_check.sh --cpu OUTDIR    # the same script on CPU: smoke bench shapes, gloo
#
# Parts, each with its own time limit (all limits together stay under CHECK_BUDGET_S, 465 s by
# default; 900 s with --cpu), so that one failure or hang does not eat the others' time; a part that fails is named
# in summary.txt with its last error line, the rest still run:
#   env            device, driver, Python package versions               env.log
#   bench-mbs2     bench_distill.py --gpu: neo kd trl-gkd neo-offline neo-naive lora at micro-batch 2:
#                  tokens/s, peak GiB, GPU busy %, micro-batches under the CUDA sync check
#                                                                          bench-mbs2.{log,json}
#   prep, teacher, distill-ddp, distill-fsdp, distill-sigterm, distill-resume, merge-eval
#                  the library's step CLIs end to end on the tiny preset (NCCL when 2 GPUs; with one
#                  GPU the world size is 1 and no process group is made: NCCL refuses two ranks on one
#                  device); a SIGTERM mid-run checkpoints, the re-run resumes and ends at the
#                  uninterrupted run's step                               <part>.log, <part>/
#   profile        torch.profiler tables (CPU ops + kernels) of neo, neo-offline, lora
#                                                                          profile/prof-*.txt
#   bench-auto     the bench (neo kd neo-offline lora) with distill.micro_batch_size=auto (llmneo
#                  versions that have it)
#                                                                          bench-auto.{log,json}
#   summary.txt    one line per part (ok / FAILED and why, seconds) and the bench tables
#
# On the GPU machine the repository runs from its source tree: configs/, components/ and pipelines/
# are made importable as llmneo_presets, llmneo_components and llmneo_pipelines through links in a
# scratch folder on PYTHONPATH, and wheels in WHEELS (default: wheels/ in the repository, if any) are
# installed with --no-deps into a scratch folder that comes first on PYTHONPATH.
# Environment: PYTHON (default python3), WHEELS, CHECK_BUDGET_S, CLI_STEPS (distill steps, default 30; 60 with --cpu),
# MAX_MEMORY_GIB (for bench-auto), NO_SYNC_CHECK=1 (bench without the CUDA sync check, e.g. to
# measure a trainer that still synchronises inside its micro-batches).
set -uo pipefail

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; shift; fi
OUTDIR="${1:-${OUT:-gpu-check}}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${CHECK_BUDGET_S:-$([[ $MODE == cpu ]] && echo 900 || echo 465)}"
STEPS="${CLI_STEPS:-$([[ $MODE == cpu ]] && echo 60 || echo 30)}"
mkdir -p "$OUTDIR" || { echo "error: cannot create $OUTDIR" >&2; exit 2; }
OUTDIR="$(cd "$OUTDIR" && pwd)"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
SUMMARY="$OUTDIR/summary.txt"
: > "$SUMMARY"
START=$(date +%s)

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRL_EXPERIMENTAL_SILENCE=1

# ---------------------------------------------------------------- source tree on PYTHONPATH
mkdir -p "$SCRATCH/pypath" "$SCRATCH/site"
ln -s "$REPO/configs" "$SCRATCH/pypath/llmneo_presets"
ln -s "$REPO/components" "$SCRATCH/pypath/llmneo_components"
ln -s "$REPO/pipelines" "$SCRATCH/pypath/llmneo_pipelines"
WHEELS="${WHEELS:-$REPO/wheels}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$SCRATCH/site" \
    "$WHEELS"/*.whl > "$OUTDIR/wheels.log" 2>&1 || echo "wheels: FAILED (see wheels.log)" >> "$SUMMARY"
fi
export PYTHONPATH="$SCRATCH/site:$REPO:$SCRATCH/pypath${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------- one part = one time limit
# part NAME LIMIT_S COMMAND...: output in NAME.log, one line in summary.txt
part() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 15 )); then
    echo "$name: SKIPPED (time budget of ${BUDGET}s spent)" | tee -a "$SUMMARY"
    return 1
  fi
  (( limit > left )) && limit=$left
  local t0=$(date +%s) rc
  # a child bash runs it (the shell functions below are exported), so that timeout can end it
  timeout -k 10 "$limit" bash -c '"$@"' part "$@" > "$OUTDIR/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    echo "$name: ok (${dt}s)" | tee -a "$SUMMARY"
  else
    local why
    why=$(grep -E '^(error:|[A-Za-z.]*Error)|Error:|FAILED' "$OUTDIR/$name.log" | tail -1)
    (( rc == 124 || rc == 137 )) && why="timed out after ${limit}s${why:+; last error: $why}"
    echo "$name: FAILED rc=$rc (${dt}s): ${why:-$(tail -1 "$OUTDIR/$name.log")}" | tee -a "$SUMMARY"
  fi
  return $rc
}

# ---------------------------------------------------------------- env
env_report() {
  date -u
  echo "repository: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  command -v nvidia-smi > /dev/null && nvidia-smi
  "$PY" - <<'EOF'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| devices", torch.cuda.device_count(), *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
for name in ("transformers", "peft", "trl", "datasets", "accelerate", "lm_eval"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
}
export PY REPO
export -f env_report
part env 60 env_report

if [[ $MODE == gpu ]]; then
  BENCH=(--gpu ${NO_SYNC_CHECK:+--no-sync-check}); BENCH_MAIN=(--only neo,kd,trl-gkd,neo-offline,neo-naive,lora --steps 4)
  PROFILED=neo,neo-offline,lora; AUTO=neo,kd,neo-offline,lora
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  NPROC=$(( NGPU >= 2 ? 2 : 1 ))
else
  # CPU: the code paths only (no device to profile, so one configuration each)
  BENCH=(--smoke); BENCH_MAIN=(--only neo,lora --steps 2); PROFILED=lora; AUTO=neo
  NPROC=2
fi

# ---------------------------------------------------------------- the bench, micro-batch 2
part bench-mbs2 210 "$PY" "$REPO/benchmarks/bench_distill.py" "${BENCH[@]}" "${BENCH_MAIN[@]}" \
  --json "$OUTDIR/bench-mbs2.json"

# ---------------------------------------------------------------- the step CLIs end to end
cli() { "$PY" -m llmneo.cli "$@"; }
export W="$OUTDIR"  # the step folders
export TRAIN="distill.nproc_per_node=$NPROC distill.max_steps=$STEPS distill.save_every=10 distill.eval_every=0"
distill() {  # distill OUT STRATEGY
  # shellcheck disable=SC2086
  "$PY" -m llmneo.cli distill --preset tiny --dataset "$W/dataset" --teacher "$W/teacher" \
    --student "$W/student" --out "$W/$1" $TRAIN distill.strategy="$2"
}
# SIGTERM to the launcher once step 3 is logged: it must checkpoint, stop and exit non-zero
distill_sigterm() {
  # shellcheck disable=SC2086
  "$PY" -m llmneo.cli distill --preset tiny --dataset "$W/dataset" --teacher "$W/teacher" \
    --student "$W/student" --out "$W/distill-resume" $TRAIN distill.strategy=ddp &
  local pid=$! i
  for i in $(seq 1 1200); do
    [[ -f "$W/distill-resume/train_log.jsonl" ]] && (( $(wc -l < "$W/distill-resume/train_log.jsonl") >= 3 )) && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
  done
  if ! kill -TERM $pid 2>/dev/null; then
    wait $pid; echo "error: the run ended before the SIGTERM"; return 1
  fi
  wait $pid && { echo "error: the run exited 0 after SIGTERM (it should stop at a checkpoint)"; return 1; }
  ls "$W/distill-resume/checkpoint" && return 0
}
distill_resumed() {
  distill distill-resume ddp || return 1
  "$PY" - "$W/distill-ddp" "$W/distill-resume" <<'EOF'
import json, sys
from pathlib import Path
(ref, res) = ([json.loads(x) for x in (Path(p) / "train_log.jsonl").read_text().splitlines()] for p in sys.argv[1:])
card = json.loads((Path(sys.argv[2]) / "card.json").read_text())
print(f"resumed from step {card.get('resumed_from_step')}; final step {res[-1]['step']} loss {res[-1]['loss']!r}, "
      f"uninterrupted {ref[-1]['step']} loss {ref[-1]['loss']!r}, difference {abs(res[-1]['loss'] - ref[-1]['loss']):.3g}")
sys.exit(0 if res[-1]["step"] == ref[-1]["step"] and card.get("resumed_from_step") else 1)
EOF
}
merge_eval() {
  cli merge-eval --preset tiny --dataset "$W/dataset" --teacher "$W/teacher" --student "$W/student" \
    --adapter "$W/distill-ddp" --out "$W/model" distill.nproc_per_node=$NPROC
}
export PY NPROC
export -f cli distill distill_sigterm distill_resumed merge_eval
if part prep 60 cli prep --preset tiny --out "$W/dataset" &&
   part teacher 60 cli teacher --preset tiny --dataset "$W/dataset" --teacher-out "$W/teacher" --student-out "$W/student"; then
  part distill-ddp 90 distill distill-ddp ddp
  part distill-fsdp 90 distill distill-fsdp fsdp
  part distill-sigterm 90 distill_sigterm && part distill-resume 90 distill_resumed
  part merge-eval 120 merge_eval
fi

# ---------------------------------------------------------------- a short profile
part profile 100 "$PY" "$REPO/benchmarks/bench_distill.py" "${BENCH[@]}" --only "$PROFILED" \
  --warmup 1 --steps 1 --profile-steps 2 --profile-dir "$OUTDIR/profile" --json "$OUTDIR/profile.json"

# ---------------------------------------------------------------- the bench, micro-batch auto
part bench-auto 180 "$PY" "$REPO/benchmarks/bench_distill.py" "${BENCH[@]}" --mbs auto \
  ${MAX_MEMORY_GIB:+--max-memory-gib "$MAX_MEMORY_GIB"} --only "$AUTO" \
  --steps 3 --json "$OUTDIR/bench-auto.json"

# ---------------------------------------------------------------- summary
{
  echo
  echo "total: $(( $(date +%s) - START ))s, mode $MODE, distill processes $NPROC"
  for f in bench-mbs2 bench-auto; do
    [[ -f "$OUTDIR/$f.log" ]] && { echo; echo "== $f"; sed -n '/^config /,$p' "$OUTDIR/$f.log"; }
  done
  [[ -f "$OUTDIR/distill-resume.log" ]] && { echo; grep -h "^resumed from" "$OUTDIR/distill-resume.log"; }
} >> "$SUMMARY"
cat "$SUMMARY"
# exit status: the parts that must work everywhere (bench-auto needs a newer trainer)
! grep -E "^(env|bench-mbs2|prep|teacher|distill-[a-z]+|merge-eval|profile): (FAILED|SKIPPED)" "$SUMMARY" > /dev/null
