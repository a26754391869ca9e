#!/usr/bin/env bash
# The GPU measurements, run on the lent machine from the project root with .whl/ carried
# (../shared/tools/device-wheels .whl, plus pycountry, periodictable, sentencepiece and mistral-common wheels; for the
# resume phase, .whl/dvc/ with DVC and dvclive for Python 3.12: pip wheel antlr4-python3-runtime==4.9.3 -w .whl/dvc,
# then pip download dvc dvclive -d .whl/dvc --find-links .whl/dvc --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --implementation cp, at requirements.txt's versions):
#   bash bench/gpu_run.sh OUT_DIR PHASE...
# Phases (setup runs first, once per machine):
#   setup  install the wheels, build the random-init Mistral-7B-shaped model, run fetch/sample/format for it
#   stage  the train stage on one GPU with the project's defaults (Liger, packing, bf16 frozen weights)
#   ddp    the train stage on 2 GPUs (train.distributed=ddp)
#   ddpbench  bench/ddp_bench.py on 1 and 2 GPUs: DDP scaling efficiency
#   fsdp   the train stage on 2 GPUs with train.distributed=fsdp
#   fsdpbench  bench/ddp_bench.py on 2 GPUs, ddp, fsdp (FSDP2), fsdp without Liger, 4x2048 tokens per GPU: FSDP's
#              speed over DDP's, and Liger's share of it
#   memcap  after fsdpbench: each GPU capped between FSDP's and DDP's peaks (or at $CAP_GIB), expandable segments:
#           DDP on one capped card, then FSDP on two
#   cap7b  the 7B shape with each GPU capped below the whole 4-bit base (CAP_GIB, default 3.8; CAP_ROWS rows of 2048
#          tokens, default 1): DDP on one capped card, FSDP on two, FSDP with train.fsdp_offload on two; then FSDP
#          against FSDP with offload, uncapped (offload's speed cost)
#   bigckpt  a Llama-2-70B-shaped random checkpoint written already in NF4 (bench/quantized_checkpoint.py, ~37 GB on
#            disk, one layer at a time on GPU 0), and links to its first 8, 16 and 32 layers
#   big    after setup and bigckpt: the train stage (fsdp, 2 GPUs, 1 bin of 2048 tokens per GPU, BIG_STEPS steps)
#          on each depth of BIG_LAYERS (default 8 16 32 80), every GPU capped at BIG_CAP_GIB (default 24)
#          (bench/capped_stage.py); tok/s, the peaks per GPU while loading and training, and host memory (each
#          process's peak RSS, and the host's least MemAvailable) per depth, then bench/layer_fit.py's line
#          through them; BIG_OFFLOAD=true adds train.fsdp_offload
#   multinode  the train stage (ddp) as 1 node of 2 GPUs (twice: the run-to-run spread), then as 2 nodes of 1 GPU
#              each on this host (the README's multi-node recipe, CUDA_VISIBLE_DEVICES=0 / 1); the adapters compared
#   resume  after setup, with .whl/dvc/ (dvc and dvclive wheels): bench/resume_check.py for ddp then fsdp on 2 GPUs
#           (RESUME_MODES): the stage under `dvc repro` killed after checkpoint-3 of 6 steps, resumed, and run whole
#   train  bench/train_bench.py: baseline and the project's variants, and the memory table
#   eval   bench/eval_bench.py: plain generate() against the project's generation (run agreement first to fold its
#          figures in; EVAL_ARGS="--profile-steps 8" adds the top kernels per decoding step)
#   evalstage  the evaluate stage (base model) over 500 eval prompts (data.eval_size=500, eval.max_new_tokens auto),
#            eval.generation plain then auto: both wall times and the rows that differ (eval_stage_500.json)
#   agreement  bench/sure_model.py: a small Mistral trained on the bundled data, every generation path against plain
#   unsloth  bench/unsloth_bench.py in its own process, against the train phase's JSON (run train first);
#            needs .whl/unsloth-site.tar.gz (bash bench/make_unsloth_site.sh)
#   budget  bench/budget_bench.py then bench/unsloth_bench.py --caps: each tool's best setting under each memory cap
#           (BUDGET_CAPS, GiB), the project through the train stage's memory budget; the table in budget.json
#           (BUDGET_ARGS="--headroom 1.1" plans with another activation headroom than the stage's; BUDGET_WARMUP
#           untimed steps per cell for both tools, default 2; the packed bins depend on it, the same for both)
#   varlen  bench/varlen_check.py: packed rows through the variable-length kernel (grouped-query heads unrepeated)
#           against each row alone and against sdpa's block-diagonal mask: values and input gradients, not memory
#   profile  bench/train_profile.py: where a training step's GPU time goes, baseline and project
#   families  after setup, with .family-tokenizers/ carried (made here: python -m bench.make_random_family
#             --pack-tokenizers .family-tokenizers): for each of FAMILIES (default llama3 qwen2.5 qwen3 gemma2
#             gemma3-text phi3), its released shape at random init in /tmp/family-FAMILY (bench/make_random_family.py),
#             then with the family's profile (bench/family_table.py's FAMILY_PROFILES): bench/train_bench.py's project
#             variant packed and unpacked (no baseline, no memory table; BENCH_STEPS, ALPACA_STEPS),
#             bench/eval_bench.py plain against auto (EVAL_PROMPTS, EVAL_TOKENS, EVAL_BATCH), and for UNSLOTH_FAMILIES
#             (default llama3 qwen2.5) bench/unsloth_bench.py against that train JSON (UNSLOTH_DROPOUTS, default 0,
#             the profiles' dropout); each under FAMILY_{BUILD,TRAIN,EVAL,UNSLOTH}_TIMEOUT, its output in
#             family_FAMILY_{build,train,eval,unsloth}.log, the model deleted after; then bench/family_table.py's table
#             (families.json, families.md). A family takes minutes: give each call one or two (FAMILIES=...)
set -uo pipefail
out=${1:?usage: gpu_run.sh OUT_DIR PHASE...}; shift
mkdir -p "$out"
model=/tmp/mistral-7b-random
big_model=/tmp/llama2-70b-nf4
export ALPACA_QLORA_MODEL_CACHE=/tmp/model-cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site:$PWD ALPACA_QLORA_MISTRAL_TOKENIZER=/tmp/tokenizer.model.v1
# The Mistral profile, with what this machine lacks overridden: the random-init model for the hub's weights, the
# bundled data for the hub's, no W&B; and the bench's own micro-batch (2 bins of 2048 tokens with packing), logging
# and checkpoint cadence.
stage_params=(--profile profiles/mistral-7b.yaml model.name="$model" data.source=bundled train.wandb=false
  train.micro_batch_size=2 train.logging_steps=2 train.dvclive=false train.save_steps=1000)

train_stage() {  # NAME [extra params...]
  local name=$1; shift
  python -m bench.set_params "${stage_params[@]}" "$@" && \
    timeout "${STAGE_TIMEOUT:-300}" python stages/train.py 2>&1 | tr '\r' '\n' | grep -v "it/s]\|step/s\|s/step" | tail -25 | tee "$out/$name.log"
  [ -f metrics/train.json ] && cp metrics/train.json "$out/$name.json" && rm -f metrics/train.json
}

family_bench() {  # LOG LIMIT COMMAND...: COMMAND on GPU 0 under LIMIT seconds, its output less the noise in LOG,
  # its exit status there when not 0 (124: timed out), the last lines shown (the families phase)
  local log=$1 limit=$2; shift 2
  CUDA_VISIBLE_DEVICES=0 timeout "$limit" "$@" 2>&1 | tr '\r' '\n' \
    | grep -v "Warning\|Loading weights\|liger_kernel\|Measurement(\|Writing model shards" > "$log"
  local status=${PIPESTATUS[0]}
  [ "$status" = 0 ] || echo "exit $status after at most ${limit}s: $*" >> "$log"
  tail -"${FAMILY_TAIL:-6}" "$log"
}

for phase in "$@"; do
  echo "=== $phase $(date +%T)"
  case $phase in
    setup)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        $(ls .whl/*.whl | grep -v mistral_common) 2>&1 | tail -2
      python3 -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('.whl/mistral_common-*.whl')[0]); \
open('/tmp/tokenizer.model.v1','wb').write(z.read('mistral_common/data/tokenizer.model.v1'))"
      # DVC for the resume phase, in its own directory, behind the image's packages (the resume phase adds it last)
      [ -d .whl/dvc ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/dvc-site .whl/dvc/*.whl 2>&1 | tail -2
      nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
      [ -d "$model" ] || python -m bench.make_random_mistral "$model"
      python -m bench.set_params "${stage_params[@]}"
      python stages/fetch.py && python stages/sample.py && python stages/format.py ;;
    stage) train_stage train_stage_1gpu train.distributed=none train.num_processes=1 ;;
    ddp) train_stage train_stage_ddp2 train.distributed=ddp train.num_processes=2 ;;
    ddpbench)
      for n in 1 2; do
        python -m accelerate.commands.launch $([ $n -gt 1 ] && echo --multi_gpu) --num_processes $n --num_machines 1 --mixed_precision no \
          --dynamo_backend no -m bench.ddp_bench "$model" --out "$out/ddp_$n.json" --steps "${BENCH_STEPS:-8}" \
          2>&1 | tail -3
      done
      python -m bench.ddp_bench --summarize "$out/ddp_1.json" "$out/ddp_2.json" --out "$out/ddp_scaling.json" ;;
    fsdp) train_stage train_stage_fsdp2 train.distributed=fsdp train.num_processes=2 ;;
    fsdpbench)
      runs=()
      for run in ddp fsdp "fsdp --no-liger"; do
        name=$(echo "${run}_2" | tr -d ' -')
        runs+=("$out/$name.json")
        timeout "${BENCH_TIMEOUT:-180}" python -m accelerate.commands.launch --multi_gpu --num_processes 2 \
          --num_machines 1 --mixed_precision no --dynamo_backend no -m bench.ddp_bench "$model" --mode $run \
          --out "$out/$name.json" --steps "${BENCH_STEPS:-12}" --warmup 3 2>&1 | grep -v "Warning\|liger_kernel" | tail -3
      done
      python -m bench.ddp_bench --summarize "${runs[@]}" --out "$out/fsdp_vs_ddp.json" ;;
    memcap)
      cap=${CAP_GIB:-$(python -m bench.ddp_bench --cap-from "$out/fsdp_vs_ddp.json" --out /dev/null)} || continue
      echo "cap: $cap GiB per GPU"
      export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # both runs: the cap meets allocations, not cache slack
      CUDA_VISIBLE_DEVICES=0 timeout "${BENCH_TIMEOUT:-180}" python -m accelerate.commands.launch --num_processes 1 \
        --num_machines 1 --mixed_precision no --dynamo_backend no -m bench.ddp_bench "$model" --mode ddp \
        --memory-cap-gib "$cap" --out "$out/ddp_1_capped.json" --steps 4 --warmup 1 2>&1 | tail -2
      timeout "${BENCH_TIMEOUT:-180}" python -m accelerate.commands.launch --multi_gpu --num_processes 2 \
        --num_machines 1 --mixed_precision no --dynamo_backend no -m bench.ddp_bench "$model" --mode fsdp \
        --memory-cap-gib "$cap" --out "$out/fsdp_2_capped.json" --steps 4 --warmup 1 2>&1 | tail -2
      python -m bench.ddp_bench --summarize "$out/ddp_1_capped.json" "$out/fsdp_2_capped.json" \
        --out "$out/memcap.json" ;;
    cap7b)
      export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
      bench=(--num_machines 1 --mixed_precision no --dynamo_backend no -m bench.ddp_bench "$model" --rows "${CAP_ROWS:-1}")
      CUDA_VISIBLE_DEVICES=0 timeout "${BENCH_TIMEOUT:-240}" python -m accelerate.commands.launch --num_processes 1 \
        "${bench[@]}" --mode ddp --memory-cap-gib "${CAP_GIB:-3.8}" --out "$out/cap7b_ddp_1.json" --steps 4 --warmup 1 2>&1 | tail -2
      for extra in "" --offload; do
        timeout "${BENCH_TIMEOUT:-240}" python -m accelerate.commands.launch --multi_gpu --num_processes 2 "${bench[@]}" \
          --mode fsdp $extra --memory-cap-gib "${CAP_GIB:-3.8}" --out "$out/cap7b_fsdp_2${extra:+_offload}.json" --steps 4 \
          --warmup 1 2>&1 | tail -2
        timeout "${BENCH_TIMEOUT:-240}" python -m accelerate.commands.launch --multi_gpu --num_processes 2 "${bench[@]}" \
          --mode fsdp $extra --out "$out/uncapped_fsdp_2${extra:+_offload}.json" --steps "${BENCH_STEPS:-12}" --warmup 3 2>&1 | tail -2
      done
      python -m bench.ddp_bench --summarize "$out"/cap7b_*.json "$out"/uncapped_fsdp_2*.json --out "$out/cap7b.json" ;;
    bigckpt)
      [ -f "$big_model/config.json" ] || CUDA_VISIBLE_DEVICES=0 python -m bench.quantized_checkpoint "$big_model"
      for layers in 8 16 32; do
        python -m bench.quantized_checkpoint "$big_model-$layers" --subset-of "$big_model" --layers $layers
      done
      du -shL "$big_model" ;;
    big)
      fits=()
      for layers in ${BIG_LAYERS:-8 16 32 80}; do
        dir=$big_model; [ "$layers" = 80 ] || dir=$big_model-$layers
        python -m bench.set_params "${stage_params[@]}" model.name="$dir" train.distributed=fsdp train.num_processes=2 \
          train.micro_batch_size=1 train.max_steps="${BIG_STEPS:-6}" train.logging_steps=1 \
          train.fsdp_offload="${BIG_OFFLOAD:-false}"
        (while sleep 1; do grep MemAvailable /proc/meminfo; done) > "$out/big_${layers}_meminfo.txt" &
        sampler=$!
        timeout "${BIG_TIMEOUT:-900}" python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
          --mixed_precision no --dynamo_backend no -m bench.capped_stage "${BIG_CAP_GIB:-24}" 2>&1 | tr '\r' '\n' \
          | grep -v "it/s]\|step/s\|s/step\|Warning" | tail -12 | tee "$out/big_$layers.log"
        kill $sampler
        [ -f metrics/train.json ] || { echo "no metrics at $layers layers"; continue; }
        python -c "import json, sys; free = [int(l.split()[1]) / 2**20 for l in open(sys.argv[3])]; run = {**json.load(
open('metrics/train.json')), **json.load(open('metrics/timing/train.json')), 'layers': int(sys.argv[1]), 'cap_gib':
float(sys.argv[2]), 'host_used_peak_gib': round(free[0] - min(free), 2)}; json.dump(run, open(sys.argv[4], 'w'),
indent=2)" \
          "$layers" "${BIG_CAP_GIB:-24}" "$out/big_${layers}_meminfo.txt" "$out/big_$layers.json"
        rm -f metrics/train.json; rm -rf models/adapter
        fits+=("$out/big_$layers.json")
      done
      [ ${#fits[@]} -gt 0 ] && python -m bench.layer_fit "${fits[@]}" --full-layers 80 --out "$out/big_fit.json" ;;
    multinode)
      train_stage multinode_1node train.distributed=ddp train.num_processes=2
      rm -rf /tmp/adapter_1node && cp -r models/adapter /tmp/adapter_1node && rm -rf models/adapter
      # the 1-node run again: its own run-to-run spread is the floor any 2-node difference is judged against
      train_stage multinode_1node_again train.distributed=ddp train.num_processes=2
      python -m bench.compare_adapters /tmp/adapter_1node models/adapter --out "$out/multinode_noise_floor.json"
      rm -rf models/adapter
      port=$((29600 + RANDOM % 100))
      for rank in 0 1; do  # the README's recipe, this host as both machines
        CUDA_VISIBLE_DEVICES=$rank timeout "${STAGE_TIMEOUT:-300}" python -m accelerate.commands.launch --multi_gpu \
          --num_machines 2 --machine_rank $rank --main_process_ip 127.0.0.1 --main_process_port $port \
          --num_processes 2 --mixed_precision no --dynamo_backend no stages/train.py > "$out/multinode_node$rank.log" 2>&1 &
      done
      wait
      tr '\r' '\n' < "$out/multinode_node0.log" | grep -v "it/s]\|step/s\|s/step" | tail -5
      [ -f metrics/train.json ] && cp metrics/train.json "$out/multinode_2nodes.json" && rm -f metrics/train.json
      python -m bench.compare_adapters /tmp/adapter_1node models/adapter --out "$out/multinode.json" ;;
    resume)
      for mode in ${RESUME_MODES:-ddp fsdp}; do
        python -m bench.set_params "${stage_params[@]}" train.distributed=$mode train.num_processes=2 \
          train.max_steps=6 train.save_steps=3 train.logging_steps=1 train.dvclive=true
        PYTHONPATH=$PYTHONPATH:/tmp/dvc-site timeout "${RESUME_TIMEOUT:-540}" python -m bench.resume_check \
          --mode $mode --kill-after 3 --out "$out/resume_$mode.json" 2>&1 | grep -v "Warning" | tail -16
        cp killed.log "$out/resume_${mode}_killed.log" 2>/dev/null
      done ;;
    train)
      CUDA_VISIBLE_DEVICES=0 timeout "${TRAIN_TIMEOUT:-420}" python -m bench.train_bench "$model" \
        --out "$out/train_bench.json" --steps "${BENCH_STEPS:-10}" --warmup 2 ${TRAIN_ARGS:-} 2>&1 \
        | grep -v "Warning\|Loading weights\|liger_kernel" | tail -40 ;;
    eval)
      CUDA_VISIBLE_DEVICES=0 timeout "${EVAL_TIMEOUT:-420}" python -m bench.eval_bench "$model" \
        --out "$out/eval_bench.json" --agreement "$out/sure_model.json" ${EVAL_ARGS:-} 2>&1 | grep -v "Warning\|Loading weights\|liger_kernel" | tail -40 ;;
    evalstage)
      eval_params=(data.eval_size=${EVAL_ROWS:-500} eval.batch_size=${EVAL_BATCH:-128} eval.max_new_tokens=${EVAL_TOKENS:-auto})
      python -m bench.set_params "${stage_params[@]}" "${eval_params[@]}" && python stages/sample.py && python stages/format.py
      for method in ${EVAL_METHODS:-plain auto}; do
        python -m bench.set_params "${stage_params[@]}" "${eval_params[@]}" eval.generation=$method
        started=$(date +%s.%N)
        timeout "${STAGE_TIMEOUT:-540}" python stages/evaluate.py base 2>&1 | grep "INFO evaluate\|Error\|dequantized" | tail -4
        python -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))" "$started" "$(date +%s.%N)" \
          > "$out/evalstage_wall_$method.txt"
        cp metrics/eval_base.json "$out/eval_stage_base_$method.json"
        cp metrics/timing/evaluate_base.json "$out/eval_stage_base_${method}_timing.json"
        cp data/predictions/base.jsonl "$out/predictions_base_$method.jsonl"
      done
      python -m bench.eval_stage_compare "$out" ${EVAL_METHODS:-plain auto} | tee "$out/eval_stage_compare.txt" ;;
    agreement)
      CUDA_VISIBLE_DEVICES=0 timeout "${AGREEMENT_TIMEOUT:-420}" python -m bench.sure_model --out "$out/sure_model.json" \
        ${AGREEMENT_ARGS:-} 2>&1 | grep -v "Warning\|Loading weights" | tail -60 ;;
    unsloth)
      mkdir -p /tmp/unsloth-site && tar xzf .whl/unsloth-site.tar.gz -C /tmp/unsloth-site
      CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/unsloth-site:$PYTHONPATH UNSLOTH_DISABLE_STATISTICS=1 \
        timeout "${UNSLOTH_TIMEOUT:-420}" python -m bench.unsloth_bench "$model" --baseline "$out/train_bench.json" \
        --out "$out/unsloth_bench.json" --steps "${BENCH_STEPS:-10}" --warmup 2 ${UNSLOTH_ARGS:-} 2>&1 \
        | grep -v "Warning\|Loading weights\|Measurement(" | tail -40 ;;
    budget)
      caps=${BUDGET_CAPS:-12,24,80}
      export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # as the train stage sets it (both tools get it)
      CUDA_VISIBLE_DEVICES=0 timeout "${BUDGET_TIMEOUT:-300}" python -m bench.budget_bench "$model" --caps "$caps" \
        --out "$out/budget_project.json" --steps "${BENCH_STEPS:-6}" --warmup "${BUDGET_WARMUP:-2}" ${BUDGET_ARGS:-} 2>&1 \
        | grep -v "Warning\|Loading weights\|liger_kernel" > "$out/budget_project.log"; tail -30 "$out/budget_project.log"
      [ -n "${BUDGET_PROJECT_ONLY:-}" ] && continue
      mkdir -p /tmp/unsloth-site && tar xzf .whl/unsloth-site.tar.gz -C /tmp/unsloth-site
      CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/unsloth-site:$PYTHONPATH UNSLOTH_DISABLE_STATISTICS=1 \
        timeout "${UNSLOTH_TIMEOUT:-300}" python -m bench.unsloth_bench "$model" --caps "$caps" \
        --out "$out/budget_unsloth.json" --steps "${BENCH_STEPS:-6}" --warmup "${BUDGET_WARMUP:-2}" 2>&1 \
        | grep -v "Warning\|Loading weights\|Measurement(" | tail -30
      python -m bench.budget_bench --summarize "$out/budget_project.json" "$out/budget_unsloth.json" \
        --out "$out/budget.json" ;;
    varlen)  # packed rows through the variable-length kernel (grouped-query heads unrepeated) against sdpa
      CUDA_VISIBLE_DEVICES=0 timeout "${VARLEN_TIMEOUT:-120}" python -m bench.varlen_check --out "$out/varlen_check.json" \
        2>&1 | tail -12 ;;
    profile)
      CUDA_VISIBLE_DEVICES=0 timeout "${PROFILE_TIMEOUT:-300}" python -m bench.train_profile "$model" \
        --out "$out/train_profile.json" ${PROFILE_ARGS:-} 2>&1 | grep -v "Warning\|Loading weights\|liger_kernel" | tail -40 ;;
    families)
      for family in ${FAMILIES:-llama3 qwen2.5 qwen3 gemma2 gemma3-text phi3}; do
        dir=/tmp/family-$family tokenizer=/tmp/tokenizer-$family log=$out/family_$family
        rm -f "$log"_*.json  # an earlier call's figures must not stand in for a bench that fails this time
        profile=$(python -m bench.family_table --profile-of "$family") || continue
        python -m bench.make_random_family "$family" "$tokenizer" --unpack-from .family-tokenizers || continue
        [ -f "$dir/config.json" ] || family_bench "${log}_build.log" "${FAMILY_BUILD_TIMEOUT:-300}" \
          python -m bench.make_random_family "$family" "$dir" --tokenizer-dir "$tokenizer"
        [ -f "$dir/config.json" ] || { echo "no model for $family"; rm -rf "$dir.partial"; continue; }
        family_bench "${log}_train.log" "${FAMILY_TRAIN_TIMEOUT:-360}" python -m bench.train_bench "$dir" \
          --profile "$profile" --variants project,unpacked --memory-rows= --steps "${BENCH_STEPS:-6}" --warmup 2 \
          --alpaca-steps "${ALPACA_STEPS:-4}" --out "${log}_train.json"
        family_bench "${log}_eval.log" "${FAMILY_EVAL_TIMEOUT:-240}" python -m bench.eval_bench "$dir" \
          --profile "$profile" --variants plain,auto --prompts "${EVAL_PROMPTS:-64}" --batch-size "${EVAL_BATCH:-64}" \
          --max-new-tokens "${EVAL_TOKENS:-64}" --out "${log}_eval.json"
        if [[ " ${UNSLOTH_FAMILIES-llama3 qwen2.5} " == *" $family "* ]] && [ -f "${log}_train.json" ]; then
          mkdir -p /tmp/unsloth-site && tar xzf .whl/unsloth-site.tar.gz -C /tmp/unsloth-site
          family_bench "${log}_unsloth.log" "${FAMILY_UNSLOTH_TIMEOUT:-300}" \
            env PYTHONPATH="/tmp/unsloth-site:$PYTHONPATH" UNSLOTH_DISABLE_STATISTICS=1 \
            python -m bench.unsloth_bench "$dir" --profile "$profile" \
            --baseline "${log}_train.json" --out "${log}_unsloth.json" --steps "${BENCH_STEPS:-6}" --warmup 2 \
            --dropouts "${UNSLOTH_DROPOUTS:-0}"
        fi
        rm -rf "$dir" "$tokenizer"
      done
      python -m bench.family_table "$out" --out "$out/families.json" | tee "$out/families.md" ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
echo "=== done $(date +%T)"
