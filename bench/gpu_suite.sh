#!/usr/bin/env bash
# The GPU suite: one markdown report per device call, on an H100/H200. Two parts, each
# sized to fit one device call with room for the machine's start and a rerun:
#
#   bash bench/gpu_suite.sh --part kernel   # <= 280 s of steps: the span kernel, one verdict
#   bash bench/gpu_suite.sh --part service  # 255 s: runner overhead, 512 x 1K, 32K, weight push
#   bash bench/gpu_suite.sh                 # both, one report
#   add --dry-run to print the steps and their time limits only, or --preflight to install
#   and check the imports without running a step
#
# The report is $OUT/gpu_suite_<part>.md ($OUT/gpu_suite.md for both; bench/results/ without
# $OUT). On the GPU box (the device tool): first, here, `bash bench/gpu_wheels.sh` (the
# wheels its image lacks, into .whl/), then call 1: carry [".whl"], command
# "bash bench/gpu_suite.sh --part kernel", timeout_s 360; if time is left, call 2: the same
# with "--part service", timeout_s 330; then give the machine back.
# The box runs its image's python3 with nothing of ours installed, so the suite installs this
# checkout and the carried wheels into a private site folder first, and checks every import
# the steps need (a missing one is named in the report at once).
#
# Steps (each under its own time limit, so one slow step cannot eat the rest; the benchmark
# steps time the largest N first and, past their --budget-s, time the remaining rows once
# instead of three times, so a slow box still reports every size):
#   kernel 1. the kernel's GPU tests (pytest -m gpu): bf16 vs the float64 reference at
#      1K..32K (two-pass and one-pass paths), no host sync per layer and one device-to-host
#      copy per batch in the credit stage (torch sync debug mode), the fallback
#   kernel 2. the span benchmark at Qwen3-8B heads, N = 32K..1K, h_hi=100 and end, against
#      the fastest SDPA backend and FlashAttention-2: whole call (triton*) and launches alone
#      (triton_kernel*), two-pass and one-pass (_lse) rows, three repeats each with the spread
#   kernel 3. the packed RL batch, 512 x 1K with 1/4 prompt (the runner's layout), against
#      torch's varlen flash attention (the runner's own attention call), both horizons
#   kernel 4. ONE verdict table: kernel-only and whole-call rows judged apart (gpu_targets.py)
#   service 1. the runner's overhead over the bare truncated forward (Qwen3-4B shape)
#   service 2. the 512 x 1K-token step of the paper (Qwen3-4B shape; target <= 6.4 s)
#   service 3. a 32K-token sequence: runner vs eager output_attentions (eager runs out of memory)
#   service 4. the weight push over NCCL (bench/weights.py --device cuda)
# Record the reports' tables in docs/BENCHMARKS.md with the commands.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0 preflight_only=0 part=all
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --preflight) preflight_only=1 ;;
    --part)
      part="${2:-}"
      shift
      ;;
    --part=*) part="${1#--part=}" ;;
    *)
      echo "gpu_suite.sh: unknown argument '$1' (use --part kernel|service|all, --dry-run, --preflight)" >&2
      exit 2
      ;;
  esac
  shift
done
case "$part" in
  kernel | service) report_name="gpu_suite_$part.md" ;;
  all) report_name="gpu_suite.md" ;;
  *)
    echo "gpu_suite.sh: --part must be kernel, service or all, not '$part'" >&2
    exit 2
    ;;
esac
out_dir="${OUT:-bench/results}"
mkdir -p "$out_dir"
report="$out_dir/$report_name"
py="${PYTHON:-python3}"
site="${SUITE_SITE:-/tmp/anchorcredit-site}"
# A step killed at its time limit keeps what it printed: nothing waits in Python's buffer.
export PYTHONUNBUFFERED=1

wheel_dir="${SUITE_WHEELS:-.whl}"

install() {
  # This checkout (not whatever anchorcredit the interpreter may hold) and the carried
  # wheels, offline, into one folder put first on the path. Prints one report line.
  local wheels=() log
  compgen -G "$wheel_dir/*.whl" >/dev/null && wheels=("$wheel_dir"/*.whl)
  rm -rf "$site"
  if log=$("$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --no-cache-dir --target "$site" "${wheels[@]}" . 2>&1); then
    echo "- install: this checkout and ${#wheels[@]} carried wheel(s) into $site"
  else
    # Fallback: the wheels alone, and the service source root on the path (enough for
    # every step but the weight push, which needs the client's root too).
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
      "${wheels[@]}" >/dev/null 2>&1
    echo "- install FAILED, running from service/ on PYTHONPATH: $(echo "$log" | grep -v "as the 'root' user" | tail -n 3 | tr '\n' ' ')"
  fi
}

preflight() {
  # Versions, the GPU, and every module the steps import: exit 1 naming what is missing.
  "$py" - <<'PY'
import importlib
import sys

NEEDED = {
    "anchorcredit.engine.span.triton_kernel": "the span kernel (kernel part, runner steps)",
    "anchorcredit.engine.span.kernel_lse": "the one-pass span kernel (kernel part)",
    "anchorcredit.runner": "bench/runner.py (service part)",
    "anchorcredit.server.app": "bench/weights.py's server (service part)",
    "anchorcredit.client": "bench/weights.py's client (service part)",
    "pytest": "the kernel's GPU tests (kernel part)",
}
versions = []
for name in ("torch", "triton", "transformers", "grpc", "google.protobuf", "numpy"):
    try:
        versions.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # noqa: BLE001 - reported, not raised
        versions.append(f"{name} missing ({err})")
print("- python:", sys.version.split()[0], "|", ", ".join(versions))
try:
    print("- anchorcredit from:", importlib.import_module("anchorcredit").__file__)
except Exception as err:  # noqa: BLE001 - reported below
    print("- anchorcredit: not importable:", err)
import torch  # noqa: E402

if torch.cuda.is_available():
    cap = torch.cuda.get_device_capability()
    print(f"- gpu: {torch.cuda.get_device_name()}, sm_{cap[0]}{cap[1]}, cuda {torch.version.cuda}")
else:
    print("- gpu: none (the CUDA steps will skip or fail)")
missing = []
for name, why in NEEDED.items():
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - reported, not raised
        missing.append(f"{name} for {why}: {type(err).__name__}: {err}")
for line in missing:
    print(f"- MISSING {line} (bash bench/gpu_wheels.sh here, then carry .whl)")
print(f"- preflight: {'ok' if not missing else f'{len(missing)} import(s) missing'}")
sys.exit(1 if missing else 0)
PY
}

# part|seconds|title|command; the kernel part ends with the verdict read from its own report.
all_steps=(
  "kernel|110|kernel GPU tests: bf16 vs float64 (1K..32K), one pass, no host sync, fallback|$py -m pytest -q -m gpu tests/engine/span tests/runner/test_credit_batch.py tests/runner/test_capture_lse.py"
  "kernel|120|span kernel, Qwen3-8B heads, N=32K..1K, h_hi=100 and end, 3 repeats|$py bench/span_benchmark.py --device cuda --n 32768 16384 8192 4096 1024 --h-hi 100 end --lse --repeats 3 --budget-s 85 --backends sdpa_flash sdpa_cudnn fa2 triton triton_kernel triton_lse triton_kernel_lse"
  "kernel|45|span kernel, the packed RL batch 512 x 1K (the runner's layout), 3 repeats|$py bench/span_benchmark.py --device cuda --batch 512 --n 1024 --prompt-frac 0.25 --h-hi 100 end --lse --repeats 3 --budget-s 30"
  "kernel|5|the verdict: kernel-only and whole-call rows against the targets|$py bench/gpu_targets.py $report"
  "service|75|runner overhead over the bare truncated forward (Qwen3-4B)|$py bench/runner.py --device cuda --dtype bfloat16 --preset qwen3-4b --n 1024 4096 8192 --tokens 16384 --methods bare runner"
  "service|60|512 x 1K-token step (Qwen3-4B; target <= 6.4 s)|$py bench/runner.py --device cuda --dtype bfloat16 --preset qwen3-4b --n 1024 --tokens 524288 --methods runner --reps 1"
  "service|60|one 32K-token sequence: runner vs eager (Qwen3-4B)|$py bench/runner.py --device cuda --dtype bfloat16 --preset qwen3-4b --n 32768 --tokens 32768 --reps 1"
  "service|60|weight push over NCCL (a random Qwen3-0.6B-shaped model, 1.2 GB bf16)|$py bench/weights.py --device cuda --preset qwen3-0.6b --repeats 2"
)
steps=()
for s in "${all_steps[@]}"; do
  [ "$part" = all ] || [ "${s%%|*}" = "$part" ] && steps+=("${s#*|}")
done
if [ "$dry" = 1 ]; then
  for s in "${steps[@]}"; do
    IFS='|' read -r limit title cmd <<<"$s"
    printf '%4ss  %s\n       %s\n' "$limit" "$title" "$cmd"
  done
  exit 0
fi

install_line=$(install)
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"  # install ran in a subshell
[[ "$install_line" == *FAILED* ]] && export PYTHONPATH="$PYTHONPATH:$PWD/service"
{
  echo "# GPU suite $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- command: \`bash bench/gpu_suite.sh --part $part\`, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "$install_line"
  echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'none found')"
  preflight
  preflight_rc=$?
  echo
} >"$report"
cat "$report" >&2
if [ "$preflight_only" = 1 ]; then
  exit "$preflight_rc"
fi

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
    grep -E '^\||passed|failed|skipped|missed|^[a-z]+=|^preset=|^cuda|^kernel:' "$log" || true
    printf '\n<details><summary>log tail</summary>\n\n```\n'
    tail -n 40 "$log"
    printf '```\n</details>\n\n'
  } >>"$report"
  [ "$rc" = 0 ] || failed=$((failed + 1))
  rm -f "$log"
done

echo "wrote $report ($failed step(s) failed)" >&2
exit "$failed"
