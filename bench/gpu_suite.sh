#!/usr/bin/env bash
# The GPU suite: one command, one markdown table file, on an H100/H200 in under 10 minutes
# (the step limits add up to 560 s; the device tool allows 600 s a command).
#
#   bash bench/gpu_suite.sh                 # writes $OUT/gpu_suite.md (or bench/results/)
#   bash bench/gpu_suite.sh --dry-run       # prints the steps and their time limits only
#
# Steps (each under its own time limit, so one slow step cannot eat the rest):
#   1. the kernel's GPU tests (pytest -m gpu tests/engine/span): bf16 vs the float64
#      reference at 1K..32K, and no host sync per layer (torch sync debug mode, test_sync.py)
#   2. the span benchmark at Qwen3-8B shapes against the fastest SDPA backend and
#      FlashAttention-2 (h_hi=100 and to the end; whole call and kernel alone), and the
#      band's column tiles at the old 128x64 (issue 16 item 5: compare triton_kernel rows),
#      and the row pass with the GQA group packed vs one head per program at 8K (item 6);
#      both horizons also time the launches with the QK^T dots not pipelined
#      (triton_kernel_nooverlap: item 6's overlap, on by default on sm_90, against off)
#   3. the runner's overhead over the bare truncated forward (Qwen3-4B shape)
#   4. the 512 x 1K-token step of the paper (Qwen3-4B shape; target <= 6.4 s)
#   5. a 32K-token sequence: runner vs eager output_attentions (eager runs out of memory)
#   6. the weight push over NCCL (bench/weights.py --device cuda), when that script exists
#   7. issue 16's targets judged from the tables above (bench/gpu_targets.py; no GPU work)
# Record the file's tables in docs/BENCHMARKS.md with the command.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
out_dir="${OUT:-bench/results}"
mkdir -p "$out_dir"
report="$out_dir/gpu_suite.md"
py="${PYTHON:-python}"

steps=(
  "115|kernel GPU tests: bf16 vs float64 (1K..32K), no sync per layer|$py -m pytest -q -m gpu tests/engine/span"
  "80|span kernel vs fastest SDPA and FA2, Qwen3-8B shapes, h_hi=100|$py -m anchorcredit.engine.span.benchmark --device cuda --reps 5 --overlap-off"
  "60|span kernel vs fastest SDPA and FA2, Qwen3-8B shapes, h_hi=end|$py -m anchorcredit.engine.span.benchmark --device cuda --h-hi end --reps 5 --no-eager --overlap-off"
  "20|band column tiles at the old 128x64 (compare with the h_hi=100 step)|$py -m anchorcredit.engine.span.benchmark --device cuda --n 4096 16384 --backends triton triton_kernel --col-block-m 128 --col-block-n 64 --reps 5"
  "25|row pass GQA-packed vs one head per program at 8K (issue 16 item 6)|$py -m anchorcredit.engine.span.benchmark --device cuda --n 8192 --backends triton_kernel triton_kernel_gqa --gqa-pack --reps 5"
  "75|runner overhead over the bare truncated forward (Qwen3-4B)|$py bench/runner.py --device cuda --dtype bfloat16 --preset qwen3-4b --n 1024 4096 8192 --tokens 16384 --methods bare runner"
  "60|512 x 1K-token step (Qwen3-4B; target <= 6.4 s)|$py bench/runner.py --device cuda --dtype bfloat16 --preset qwen3-4b --n 1024 --tokens 524288 --methods runner --reps 1"
  "60|one 32K-token sequence: runner vs eager (Qwen3-4B)|$py bench/runner.py --device cuda --dtype bfloat16 --preset qwen3-4b --n 32768 --tokens 32768 --reps 1"
  "60|weight push over NCCL|$py bench/weights.py --device cuda"
  "5|issue 16 targets: <= 0.5x FA2 (h_hi=100), <= 0.7x FA2 (end), <= 0.7x SDPA|$py bench/gpu_targets.py $report"
)

if [ "$dry" = 1 ]; then
  for s in "${steps[@]}"; do
    IFS='|' read -r limit title cmd <<<"$s"
    printf '%4ss  %s\n       %s\n' "$limit" "$title" "$cmd"
  done
  exit 0
fi

{
  echo "# GPU suite $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- command: \`bash bench/gpu_suite.sh\`, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'none found')"
  echo "- versions: $($py -c 'import torch, transformers; import importlib.util as u; t = __import__("triton").__version__ if u.find_spec("triton") else "-"; print(f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {t}, transformers {transformers.__version__}")' 2>&1)"
  echo
} >"$report"

failed=0
for s in "${steps[@]}"; do
  IFS='|' read -r limit title cmd <<<"$s"
  script=$(echo "$cmd" | awk '{print $2}')
  if [[ "$script" == bench/* ]] && [ ! -f "$script" ]; then
    printf '## %s\n\nskipped: %s is not in this checkout\n\n' "$title" "$script" >>"$report"
    continue
  fi
  echo "== $title ($limit s max)" >&2
  start=$(date +%s)
  log=$(mktemp)
  timeout "$limit" bash -c "$cmd" >"$log" 2>&1
  rc=$?
  took=$(($(date +%s) - start))
  {
    printf '## %s\n\n`%s` (rc %s, %s s)\n\n' "$title" "$cmd" "$rc" "$took"
    # Tables and summary lines only; the full log follows folded.
    grep -E '^\||passed|failed|skipped|missed a target|^[a-z]+=|^preset=|^cuda' "$log" || true
    printf '\n<details><summary>log tail</summary>\n\n```\n'
    tail -n 40 "$log"
    printf '```\n</details>\n\n'
  } >>"$report"
  [ "$rc" = 0 ] || failed=$((failed + 1))
  rm -f "$log"
done

echo "wrote $report ($failed step(s) failed)" >&2
exit "$failed"
