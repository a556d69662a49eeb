#!/usr/bin/env bash
# The GPU figures of issues 3, 4 and 6, one device call per part (each part stops itself before 10 minutes).
#
#   bash scripts/gpu_session.sh part1   # issue 3 dequant bandwidth; the 1B rows of issue 6, minilora and Unsloth
#                                       # side by side; issue 4 memory tables (chunked CE, checkpoint modes);
#                                       # issue 3's 8B 4-bit load footprint
#   bash scripts/gpu_session.sh part2   # the kernels against their references on the GPU; the 8B rows of issue 6,
#                                       # minilora and Unsloth side by side; fused kernels on/off (MINILORA_TRITON)
#   bash scripts/gpu_session.sh part3   # every kernel on the GPU; the 1B and 8B rows with all kernels; the 8B budget
#                                       # curve (6.8/7/10/14/20 GB) and 32k at 14 GB; Unsloth beside the 8B and 1B bs 8
#                                       # rows; 8B at 64k tokens
#   bash scripts/gpu_session.sh part4   # not yet run: HF+PEFT rows, the other presets, 8B at 128k, Unsloth at 64k
#   bash scripts/gpu_session.sh part5   # issue 6's whole table in one call: every minilora row, then every Unsloth
#                                       # row (~560 s: run it on a fresh machine, with DEADLINE_S=580)
#   bash scripts/gpu_session.sh part6   # long context: the 8B shape at 360,448 tokens (MLP in token chunks), and at
#                                       # 128k with chunks against last session's 128k without
#   bash scripts/gpu_session.sh part7   # the 8B rows with 8-bit AdamW (and fp32 AdamW once), lean 6.8 GB and the budget
#                                       # curve, 32k at 14 GB; Unsloth's 8B rows beside them
#   bash scripts/gpu_session.sh part8   # the LoRA term folded into the base GEMM, off and on (MINILORA_LORA_FOLD=1), 8B
#                                       # and 1B; 32k at 14 GB; Unsloth's 1B rows beside them; an 8B profile
#   bash scripts/gpu_session.sh part9   # profiles: 8B bs 2 (no checkpointing), at 7 and 10 GB budgets, 32k at 14 GB;
#                                       # the LoRA fold A/B again, interleaved
#   bash scripts/gpu_session.sh part10  # AdamW8bit in one launch (before/after: MINILORA_TRITON without adamw8bit), h from
#                                       # the gated backward kernel, the LoRA fold now on (off: MINILORA_LORA_FOLD=0)
#   bash scripts/gpu_session.sh part11  # where the GPU waits for the CPU (profiles with idle gaps): 8B bs 2, 7 GB, 1B bs 8;
#                                       # 32k at 14 GB
#   bash scripts/gpu_session.sh part12  # the 8B budget curve (7/10/14/20/40 GB and the default) with dequantized weights
#                                       # kept where the budget has room; Unsloth's two 8B modes beside it
#   bash scripts/gpu_session.sh part14  # q/k/v and gate/up joined (minilora.lora.project) against one by one
#                                       # (MINILORA_LORA_JOIN=0): 8B, 8B at 7 GB, 1B bs 8; 32k at 14 GB; kernel checks
#   bash scripts/gpu_session.sh part15  # issue 6's whole table in one call, HF+PEFT rows included: every minilora row,
#                                       # then Unsloth's and HF's. The peers' checkpoints are made in the background
#                                       # during the (GPU-bound) 32k row, to fit 10 minutes: DEADLINE_S=585
#   bash scripts/gpu_session.sh part16  # what part15 had no time left for (Unsloth 1B bs 8, HF 1B) beside minilora's 1B
#                                       # rows again; the 8B budget curve's 10/14/20 GB points
#   bash scripts/gpu_session.sh part17  # profiles of the 8B step with q/k/v and gate/up joined: default budget, 7 GB
#   bash scripts/gpu_session.sh part18  # SDPA backends (scripts/bench_attention.py), then the 8B rows with torch's
#                                       # pick, cuDNN first and flash first (MINILORA_SDPA); Unsloth's and HF's 8B rows
#   bash scripts/gpu_session.sh part19  # SDPA first calls at new lengths; the 1B rows beside Unsloth's and HF's; the
#                                       # 8B budget curve (7/10/14/20 GB); profiles of the 8B step and of 32k at 14 GB
#   bash scripts/gpu_session.sh part20  # (not yet run) batches of varying length (bench.py --vary_len), torch's SDPA pick (cuDNN)
#                                       # against flash first: what a new length's cuDNN plan costs a run
#   bash scripts/gpu_session.sh part21  # GPU tests of keep_attention; 32k at 14 GB with the attention outputs kept and
#                                       # without (MINILORA_KEEP_ATTENTION=0); the 8B rows and budget curve after the
#                                       # in-place MLP backward and q+k RoPE; part20's varying lengths (8B); a 32k profile
#   bash scripts/gpu_session.sh part22  # issue 6's whole table in one call: every minilora row and every peer row
#                                       # (Unsloth's two modes, HF+PEFT); ~590 s: a fresh machine, DEADLINE_S=595
#   bash scripts/gpu_session.sh part23  # GPU tests again (keep_attention per backend, offload, predicted peaks); varying
#                                       # lengths with flash first at a new shape (models.common.sdpa_order); the 8B row
#   bash scripts/gpu_session.sh part24  # the recompute without down_proj's GEMM, against it (MINILORA_RECOMPUTE_OUTPUT=1):
#                                       # 32k at 14 GB, 8B at 7 GB; the budget curve and the 8B row; a 32k profile
#   bash scripts/gpu_session.sh part25  # the LoRA products of one 8B layer, as written and transposed
#                                       # (scripts/bench_lora_products.py); a profile of the 8B step at 2 x 2048
#   bash scripts/gpu_session.sh part26  # CUDA graphs for the un-checkpointed layers, on (the plan's choice) and off
#                                       # (MINILORA_CUDA_GRAPHS=0), interleaved: 8B and 1B rows; Unsloth's fast rows
#   bash scripts/gpu_session.sh part27  # each row's step also timed with the CPU ahead of the GPU (bench.py --gpu_bound:
#                                       # what the GPU waits on the CPU); SM clock and power. Its _nocast jobs set
#                                       # MINILORA_LORA_CAST_CACHE=0 for a LoRA-cast cache that was tried and dropped
#   bash scripts/gpu_session.sh part28  # part26 again with the capture differentiating aliases of the LoRA weights
#                                       # (minilora/cuda_graphs.py `_run`): GPU tests; 8B and 1B rows on and off
#   bash scripts/gpu_session.sh part29  # GPU tests of checkpointing and the memory plan with graphs in; profiles of the
#                                       # 8B and 1B steps at 2 x 2048 with their layers graphed: where the GPU still waits
#   bash scripts/gpu_session.sh part30  # part22's whole table again with the un-checkpointed layers graphed (where the plan
#                                       # has room), one more 8B row, then GPU tests of graphs, checkpointing and the plan
#   bash scripts/gpu_session.sh part31  # what part30 had no time for: the 1B rows beside all three peers; the 7 GB row
#                                       # twice beside Unsloth's 8B default, and the host's pinned copy rate (it offloads)
#   bash scripts/gpu_session.sh part32  # the 8B budget curve (7/10/14/20/24 GB) beside Unsloth's two 8B modes, one call
#   bash scripts/gpu_session.sh part33  # warm-up for part30: the host's pinned copy rates, then one untimed step of
#                                       # every peer row, so that their compiles (Unsloth compiles each decoder block)
#                                       # are cached; part30 on the same warm machine then fits its table in one call
#   bash scripts/gpu_session.sh part34  # long context again on today's code, in an 80 GB H100's room (--gpu_memory_gb 79.1
#                                       # caps the allocator): the 8B shape at 360,448 tokens, one step; GPU test of the cap
#   bash scripts/gpu_session.sh part35  # after part30: 32k at 14 GB with the allocator capped there too (--gpu_memory_gb
#                                       # 14: part30's 20.8 GB reserved is cache, not need); the 8B budget curve at
#                                       # 10/14/20 GB beside Unsloth's two 8B modes; part30's GPU tests, untruncated
#   bash scripts/gpu_session.sh part36  # part35's capped 32k OOMed on fragmentation (0.9 GiB reserved, not allocated): the
#                                       # capped rows with PyTorch's expandable segments and with a budget 1 GB under the
#                                       # cap; expandable segments' cost on the graphed rows, against the plain allocator.
#                                       # Since then bench.py and train.py set expandable segments themselves (minilora/
#                                       # allocator.py); earlier parts ran on the plain allocator
#   bash scripts/gpu_session.sh part37  # the GPU test of expandable segments in the scripts' import order
#                                       # (passed); part34's 360,448 tokens again on expandable segments (not yet run)
#   bash scripts/gpu_session.sh part0   # CPU self-test of this script (tiny model, no peers), any machine
#   bash scripts/gpu_session.sh run PART:NAME...  # only these jobs (e.g. part30:u_1b_bs8, one a part skipped for time); a plain NAME if one part has it
#   bash scripts/gpu_session.sh list          # every job, its part, expected seconds and command
#   bash scripts/gpu_session.sh summary DIR   # the table again, from a part's logs
# From the device tool: run(command="bash scripts/gpu_session.sh part1", carry=[".peers"]). `.peers` is git-ignored;
# make it first on the CPU machine (~55 MB, under the 64 MiB a call may carry):
#   mkdir -p .peers && cp ../shared/bench/peers_gpu.py .peers/ && bash ../shared/bench/fetch_peer_wheels.sh .peers/whl
#
# Each job is its own process (peak memory is per job) under `timeout` (a hang costs only its cap). A job whose
# expected time no longer fits before the deadline (DEADLINE_S after the start, default 560) is skipped and
# listed, so the next call can `run` it. Logs: $OUT/<part>/<job>.log, jobs.tsv (name, exit code, seconds,
# command) and summary.txt, the table printed last. RESULT lines follow ../shared/bench/peers_gpu.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-}
[ -n "$PART" ] || { awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 2; }
shift
OUT=${OUT:-/tmp/minilora_gpu}
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-560}))
W="--warmup 3 --steps 5"   # the same warm-up and timed steps for every framework
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false W

# --- the jobs: part name expected_s cap_s command ------------------------------------------------------------
B="python3 scripts/bench.py"
jobs() {
cat <<EOF
part0 selftest_auto    20  90 $B --preset tiny --device cpu --seq_len 256 --warmup 1 --steps 2 --gc auto
part0 selftest_budget  20  90 $B --preset tiny --device cpu --seq_len 256 --warmup 1 --steps 2 --gc auto --max_memory_gb 0.0001
part0 selftest_skip  9999  90 echo never runs: expected time beyond the deadline
part1 dequant          40 180 python3 tests/bench_dequant.py
part1 m_1b_bs2         40 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W --profile
part1 m_1b_bs8         35 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part1 m_1b_bs2_offload 30 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc offload $W
part1 p_1b_make        30 240 peer_make 1b
part1 u_1b_bs2         60 300 peer_run 1b --framework unsloth --bs 2 --seq 2048
part1 u_1b_bs2_gcoff   55 300 peer_run 1b --framework unsloth --bs 2 --seq 2048 --gc off
part1 u_1b_bs8         65 300 peer_run 1b --framework unsloth --bs 8 --seq 2048
part1 memory           60 240 python3 scripts/bench_memory.py
part1 load_8b          90 360 load_8b
part2 kcheck           25  90 python3 tests/gpu_check_kernels.py
part2 p_8b_make        75 300 peer_make 8b
part2 m_8b_bs2         55 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --profile
part2 u_8b_bs2         85 300 peer_run 8b --framework unsloth --bs 2 --seq 2048
part2 u_8b_bs2_gcoff   80 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part2 m_8b_32k         75 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto $W
part2 u_8b_32k        100 360 peer_run 8b --framework unsloth --bs 1 --seq 32768
part2 m_1b_bs8         30 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part2 m_1b_bs8_nf4only 30 180 MINILORA_TRITON=nf4 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part2 m_8b_bs2_nf4only 45 240 MINILORA_TRITON=nf4 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part3 kcheck           15  90 python3 tests/gpu_check_kernels.py
part3 m_1b_bs2         17 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part3 m_1b_bs8         17 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part3 m_8b_bs2         25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --profile
part3 m_8b_bs2_lean    25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 6.8 $W
part3 m_8b_budget7     25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part3 m_8b_budget10    25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 10 $W
part3 m_8b_budget14    25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 14 $W
part3 m_8b_budget20    25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 20 $W
part3 m_8b_32k_14gb    60 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part3 p_8b_make        45 300 peer_make 8b
part3 u_8b_bs2_gcoff   55 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part3 u_1b_bs8         60 300 peer_run 1b --framework unsloth --bs 8 --seq 2048
part3 m_8b_64k        100 240 $B --preset llama-3.1-8b --batch_size 1 --seq_len 65536 --gc auto --warmup 1 --steps 2
part3 m_1b_bs8_norope  17 180 MINILORA_TRITON=nf4,rmsnorm,gated_act $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part3 m_8b_bs2_norope  22 240 MINILORA_TRITON=nf4,rmsnorm,gated_act $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part5 m_1b_bs2         17 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part5 m_1b_bs8         17 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part5 m_8b_bs2         20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part5 m_8b_budget7     20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part5 m_8b_32k_14gb    55 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part5 p_1b_make        20 240 peer_make 1b
part5 u_1b_bs2         60 300 peer_run 1b --framework unsloth --bs 2 --seq 2048
part5 u_1b_bs2_gcoff   50 300 peer_run 1b --framework unsloth --bs 2 --seq 2048 --gc off
part5 u_1b_bs8         60 300 peer_run 1b --framework unsloth --bs 8 --seq 2048
part5 p_8b_make        35 300 peer_make 8b
part5 u_8b_bs2         60 300 peer_run 8b --framework unsloth --bs 2 --seq 2048
part5 u_8b_bs2_gcoff   55 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part5 u_8b_32k        115 360 peer_run 8b --framework unsloth --bs 1 --seq 32768
part6 m_8b_360k      400 540 $B --preset llama-3.1-8b --batch_size 1 --seq_len 360448 --gc auto --mlp_chunk 8192 --warmup 0 --steps 1
part6 m_8b_128k_chunk 80 150 $B --preset llama-3.1-8b --batch_size 1 --seq_len 131072 --gc auto --mlp_chunk 8192 --warmup 0 --steps 1
part7 m_8b_bs2         20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part7 m_8b_bs2_adamw   20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --optim adamw
part7 m_8b_bs2_lean    25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 6.8 $W
part7 m_8b_budget7     25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part7 m_8b_budget10    25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 10 $W
part7 m_8b_budget14    25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 14 $W
part7 m_8b_budget20    25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 20 $W
part7 m_8b_32k_14gb    55 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part7 p_8b_make        35 300 peer_make 8b
part7 u_8b_bs2         60 300 peer_run 8b --framework unsloth --bs 2 --seq 2048
part7 u_8b_bs2_gcoff   55 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part7 u_8b_32k        115 360 peer_run 8b --framework unsloth --bs 1 --seq 32768
part8 m_8b_bs2         20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part8 m_8b_bs2_fold    20 240 MINILORA_LORA_FOLD=1 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part8 m_8b_bs2_again   20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part8 m_8b_budget7     20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part8 m_8b_budget7_fold 20 240 MINILORA_LORA_FOLD=1 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part8 m_8b_budget10    20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 10 $W
part8 m_1b_bs2         17 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part8 m_1b_bs8         17 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part8 m_1b_bs8_fold    17 180 MINILORA_LORA_FOLD=1 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part8 m_8b_32k_14gb    55 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part8 p_1b_make        20 240 peer_make 1b
part8 u_1b_bs2         60 300 peer_run 1b --framework unsloth --bs 2 --seq 2048
part8 u_1b_bs2_gcoff   50 300 peer_run 1b --framework unsloth --bs 2 --seq 2048 --gc off
part8 u_1b_bs8         60 300 peer_run 1b --framework unsloth --bs 8 --seq 2048
part8 m_8b_bs2_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --profile
part9 m_8b_bs2_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --profile --profile_rows 45
part9 m_8b_budget7_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W --profile
part9 m_8b_budget10_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 10 $W --profile
part9 m_8b_bs2_fold    20 240 MINILORA_LORA_FOLD=1 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part9 m_8b_bs2         20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part9 m_8b_bs2_fold2   20 240 MINILORA_LORA_FOLD=1 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part9 m_8b_32k_profile 70 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W --profile --profile_rows 30
part10 kcheck          20  90 python3 tests/gpu_check_kernels.py
part10 m_8b_bs2        20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part10 m_8b_bs2_optimtorch 20 240 MINILORA_TRITON=nf4,rmsnorm,gated_act,rope,cross_entropy $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part10 m_8b_bs2_nofold 20 240 MINILORA_LORA_FOLD=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part10 m_8b_bs2_again  20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part10 m_8b_budget7    20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part10 m_8b_budget7_nofold 20 240 MINILORA_LORA_FOLD=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part10 m_8b_lean       20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 6.8 $W
part10 m_1b_bs2        17 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part10 m_8b_bs2_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --profile --profile_rows 30
part11 m_8b_bs2_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --profile --profile_rows 12
part11 m_8b_budget7_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W --profile --profile_rows 12
part11 m_1b_bs8_profile 20 240 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W --profile --profile_rows 12
part11 m_8b_32k_14gb   60 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part12 kcheck          20  90 python3 tests/gpu_check_kernels.py
part12 m_8b_bs2        25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part12 m_8b_budget20   20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 20 $W
part12 m_8b_budget14   20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 14 $W
part12 m_8b_budget10   20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 10 $W
part12 m_8b_budget7    20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part12 m_8b_budget40   25 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 40 $W
part12 p_8b_make       35 300 peer_make 8b
part12 u_8b_bs2        60 300 peer_run 8b --framework unsloth --bs 2 --seq 2048
part12 u_8b_bs2_gcoff  55 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part14 kcheck          25  90 python3 tests/gpu_check_kernels.py
part14 m_8b_bs2        15 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part14 m_8b_bs2_nojoin 15 240 MINILORA_LORA_JOIN=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part14 m_8b_bs2_2      15 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part14 m_8b_bs2_nojoin2 15 240 MINILORA_LORA_JOIN=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part14 m_8b_budget7    15 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part14 m_8b_budget7_nojoin 15 240 MINILORA_LORA_JOIN=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part14 m_1b_bs8        15 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part14 m_1b_bs8_nojoin 15 180 MINILORA_LORA_JOIN=0 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part14 m_8b_32k_14gb   50 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part15 p_make_bg         1  10 peer_make_bg
part15 m_8b_32k_14gb    62 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part15 p_make_wait      30 120 peer_make_wait
part15 m_1b_bs2         17 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part15 m_1b_bs8         20 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part15 m_8b_bs2         18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part15 m_8b_budget7     20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part15 u_8b_bs2         55 300 peer_run 8b --framework unsloth --bs 2 --seq 2048
part15 u_8b_bs2_gcoff   50 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part15 u_8b_32k        100 360 peer_run 8b --framework unsloth --bs 1 --seq 32768
part15 h_8b_bs2         35 300 peer_run 8b --framework hf --bs 2 --seq 2048
part15 u_1b_bs2         45 300 peer_run 1b --framework unsloth --bs 2 --seq 2048
part15 u_1b_bs2_gcoff   40 300 peer_run 1b --framework unsloth --bs 2 --seq 2048 --gc off
part15 u_1b_bs8         45 300 peer_run 1b --framework unsloth --bs 8 --seq 2048
part15 h_1b_bs2         20 240 peer_run 1b --framework hf --bs 2 --seq 2048
part16 p_1b_make        20 240 peer_make 1b
part16 m_1b_bs2         17 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part16 m_1b_bs8         15 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part16 u_1b_bs8         60 300 peer_run 1b --framework unsloth --bs 8 --seq 2048
part16 h_1b_bs2         20 240 peer_run 1b --framework hf --bs 2 --seq 2048
part16 m_8b_budget10    18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 10 $W
part16 m_8b_budget14    18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 14 $W
part16 m_8b_budget20    18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 20 $W
part17 m_8b_bs2_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --profile --profile_rows 16
part17 m_8b_budget7_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W --profile --profile_rows 8
part18 p_make_bg         1  10 peer_make_bg 8b
part18 kcheck           25  90 python3 tests/gpu_check_kernels.py
part18 attention        30 120 python3 scripts/bench_attention.py
part18 p_make_wait      15 120 peer_make_wait 8b
part18 m_8b_bs2         18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part18 m_8b_bs2_cudnn   18 240 MINILORA_SDPA=cudnn $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part18 m_8b_bs2_flash   18 240 MINILORA_SDPA=flash $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part18 m_8b_budget7     20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part18 m_8b_budget7_cudnn 20 240 MINILORA_SDPA=cudnn $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part18 m_8b_32k_14gb    62 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part18 m_8b_32k_14gb_cudnn 62 300 MINILORA_SDPA=cudnn $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part18 u_8b_bs2         55 300 peer_run 8b --framework unsloth --bs 2 --seq 2048
part18 u_8b_bs2_gcoff   50 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part18 u_8b_32k        100 360 peer_run 8b --framework unsloth --bs 1 --seq 32768
part18 h_8b_bs2         35 300 peer_run 8b --framework hf --bs 2 --seq 2048
part19 p_make_bg         1  10 peer_make_bg 1b
part19 attention        45 150 python3 scripts/bench_attention.py
part19 m_1b_bs2         17 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part19 m_1b_bs8         17 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part19 m_8b_budget10    18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 10 $W
part19 m_8b_budget14    18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 14 $W
part19 m_8b_budget20    18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 20 $W
part19 m_8b_budget7     20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part19 m_8b_bs2         15 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part19 p_make_wait       5 120 peer_make_wait 1b
part19 u_1b_bs2         45 300 peer_run 1b --framework unsloth --bs 2 --seq 2048
part19 u_1b_bs2_gcoff   40 300 peer_run 1b --framework unsloth --bs 2 --seq 2048 --gc off
part19 u_1b_bs8         45 300 peer_run 1b --framework unsloth --bs 8 --seq 2048
part19 h_1b_bs2         20 240 peer_run 1b --framework hf --bs 2 --seq 2048
part19 m_8b_bs2_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --profile --profile_rows 16
part19 m_8b_32k_profile 70 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W --profile --profile_rows 16
part20 m_1b_vary        12  60 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto --warmup 3 --steps 40 --vary_len
part20 m_1b_vary_flash  12  60 MINILORA_SDPA=flash $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto --warmup 3 --steps 40 --vary_len
part20 m_8b_vary        25  80 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --warmup 3 --steps 40 --vary_len
part20 m_8b_vary_flash  25  80 MINILORA_SDPA=flash $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --warmup 3 --steps 40 --vary_len
part21 gputests        40 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_checkpointing.py tests/test_memory_policy.py -k cuda
part21 kcheck          25  90 python3 tests/gpu_check_kernels.py
part21 m_8b_32k_14gb   55 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part21 m_8b_32k_nokeep 55 300 MINILORA_KEEP_ATTENTION=0 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part21 m_8b_budget7    20 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part21 m_8b_bs2        15 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part21 m_8b_budget10   18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 10 $W
part21 m_8b_budget14   18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 14 $W
part21 m_8b_budget20   18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 20 $W
part21 m_1b_bs2        17 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part21 m_8b_vary       25  80 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --warmup 3 --steps 40 --vary_len
part21 m_8b_vary_flash 25  80 MINILORA_SDPA=flash $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --warmup 3 --steps 40 --vary_len
part21 m_8b_32k_profile 70 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W --profile --profile_rows 16
part22 p_make_bg         1  10 peer_make_bg 8b 1b
part22 m_8b_32k_14gb    50 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W || MINILORA_KEEP_ATTENTION=0 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part22 p_make_wait       5 120 peer_make_wait 8b 1b
part22 m_8b_bs2         12 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part22 m_8b_budget7     13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part22 m_1b_bs2         15 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part22 m_1b_bs8         11 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part22 u_8b_32k        115 360 peer_run 8b --framework unsloth --bs 1 --seq 32768
part22 u_8b_bs2         70 300 peer_run 8b --framework unsloth --bs 2 --seq 2048
part22 u_8b_bs2_gcoff   55 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part22 u_1b_bs2         55 300 peer_run 1b --framework unsloth --bs 2 --seq 2048
part22 u_1b_bs2_gcoff   42 300 peer_run 1b --framework unsloth --bs 2 --seq 2048 --gc off
part22 u_1b_bs8         48 300 peer_run 1b --framework unsloth --bs 8 --seq 2048
part22 h_8b_bs2         36 300 peer_run 8b --framework hf --bs 2 --seq 2048
part22 h_1b_bs2         20 240 peer_run 1b --framework hf --bs 2 --seq 2048
part23 gputests        25 120 python3 -m pytest -q -p no:cacheprovider tests/test_checkpointing.py tests/test_memory_policy.py -k cuda
part23 m_8b_vary       25  80 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --warmup 3 --steps 40 --vary_len
part23 m_8b_bs2        13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part24 gputests        30 150 python3 -m pytest -q -p no:cacheprovider tests/test_checkpointing.py tests/test_memory_policy.py -k cuda
part24 kcheck          25  90 python3 tests/gpu_check_kernels.py
part24 m_8b_32k_14gb   50 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part24 m_8b_32k_14gb_old 55 300 MINILORA_RECOMPUTE_OUTPUT=1 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part24 m_8b_budget7    13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part24 m_8b_budget7_old 13 240 MINILORA_RECOMPUTE_OUTPUT=1 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part24 m_8b_budget7_again 13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part24 m_8b_budget10   18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 10 $W
part24 m_8b_budget14   18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 14 $W
part24 m_8b_budget20   18 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 20 $W
part24 m_8b_bs2        13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part24 m_8b_32k_profile 70 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W --profile --profile_rows 16
part25 lora_products   20  90 python3 scripts/bench_lora_products.py
part25 m_8b_bs2_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --profile --profile_rows 40
part26 p_make_bg         1  10 peer_make_bg 8b 1b
part26 gputests        25 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
part26 m_8b_bs2        13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part26 m_8b_bs2_nograph 13 240 MINILORA_CUDA_GRAPHS=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part26 m_8b_bs2_again  13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part26 m_8b_bs2_nograph2 13 240 MINILORA_CUDA_GRAPHS=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part26 m_1b_bs2        10 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part26 m_1b_bs2_nograph 10 180 MINILORA_CUDA_GRAPHS=0 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part26 m_1b_bs8        10 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part26 m_1b_bs8_nograph 10 180 MINILORA_CUDA_GRAPHS=0 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part26 m_8b_bs2_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --profile --profile_rows 8
part26 p_make_wait       5 120 peer_make_wait 8b 1b
part26 u_8b_bs2_gcoff   45 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part26 u_1b_bs2_gcoff   38 300 peer_run 1b --framework unsloth --bs 2 --seq 2048 --gc off
part27 gputests        40 150 python3 -m pytest -q -p no:cacheprovider tests/test_lora.py tests/test_optim.py -k "cast_cache or triton_step"
part27 smi_on           1  10 smi_on
part27 m_8b_gb         13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --gpu_bound
part27 m_8b_gb_nocast  13 240 MINILORA_LORA_CAST_CACHE=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --gpu_bound
part27 m_8b_gb_2       13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --gpu_bound
part27 m_8b_gb_nocast_2 13 240 MINILORA_LORA_CAST_CACHE=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --gpu_bound
part27 m_8b_b7_gb      13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W --gpu_bound
part27 m_8b_b7_nocast  13 240 MINILORA_LORA_CAST_CACHE=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W --gpu_bound
part27 m_1b_bs2_gb     10 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W --gpu_bound
part27 m_1b_bs2_nocast 10 180 MINILORA_LORA_CAST_CACHE=0 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W --gpu_bound
part27 m_1b_bs8_gb     10 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W --gpu_bound
part27 m_8b_32k_gb     50 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W --gpu_bound
part27 smi_off          1  10 smi_off
part28 gputests        25 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py
part28 m_8b_bs2        13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --gpu_bound
part28 m_8b_bs2_nograph 13 240 MINILORA_CUDA_GRAPHS=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --gpu_bound
part28 m_1b_bs2        10 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W --gpu_bound
part28 m_1b_bs2_nograph 10 180 MINILORA_CUDA_GRAPHS=0 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W --gpu_bound
part28 m_8b_bs2_again  13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part28 m_8b_bs2_nograph2 13 240 MINILORA_CUDA_GRAPHS=0 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part28 m_1b_bs8        10 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part28 m_1b_bs8_nograph 10 180 MINILORA_CUDA_GRAPHS=0 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part29 gputests        40 150 python3 -m pytest -q -p no:cacheprovider tests/test_checkpointing.py tests/test_memory_policy.py tests/test_lora.py -k "cuda or gated"
part29 m_8b_bs2_profile 30 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W --profile --profile_rows 12
part29 m_1b_bs2_profile 25 240 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W --profile --profile_rows 12
part30 p_make_bg         1  10 peer_make_bg 8b 1b
part30 m_8b_32k_14gb    50 300 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W || MINILORA_KEEP_ATTENTION=0 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 $W
part30 p_make_wait       5 120 peer_make_wait 8b 1b
part30 m_8b_bs2         12 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part30 m_8b_budget7     13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part30 m_1b_bs2         15 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part30 m_1b_bs8         11 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part30 u_8b_32k        115 360 peer_run 8b --framework unsloth --bs 1 --seq 32768
part30 u_8b_bs2         70 300 peer_run 8b --framework unsloth --bs 2 --seq 2048
part30 u_8b_bs2_gcoff   55 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part30 u_1b_bs2         55 300 peer_run 1b --framework unsloth --bs 2 --seq 2048
part30 u_1b_bs2_gcoff   42 300 peer_run 1b --framework unsloth --bs 2 --seq 2048 --gc off
part30 u_1b_bs8         48 300 peer_run 1b --framework unsloth --bs 8 --seq 2048
part30 h_8b_bs2         36 300 peer_run 8b --framework hf --bs 2 --seq 2048
part30 h_1b_bs2         20 240 peer_run 1b --framework hf --bs 2 --seq 2048
part30 m_8b_bs2_again   13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part30 gputests        40 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_checkpointing.py tests/test_memory_policy.py -k "cuda or graph"
part31 pcie            8  60 pcie_probe
part31 p_make_bg         1  10 peer_make_bg 8b 1b
part31 m_8b_budget7     13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W --gpu_bound
part31 m_1b_bs2         15 180 $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part31 m_1b_bs8         11 180 $B --preset llama-3.2-1b --batch_size 8 --seq_len 2048 --gc auto $W
part31 p_make_wait       5 120 peer_make_wait 8b 1b
part31 u_1b_bs8         60 300 peer_run 1b --framework unsloth --bs 8 --seq 2048
part31 u_1b_bs2_gcoff   55 300 peer_run 1b --framework unsloth --bs 2 --seq 2048 --gc off
part31 h_1b_bs2         25 240 peer_run 1b --framework hf --bs 2 --seq 2048
part31 u_8b_bs2         90 300 peer_run 8b --framework unsloth --bs 2 --seq 2048
part31 m_8b_budget7_b   13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part31 u_1b_bs2         88 300 peer_run 1b --framework unsloth --bs 2 --seq 2048
part32 p_make_bg         1  10 peer_make_bg 8b
part32 m_8b_budget7     13 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 $W
part32 m_8b_budget10    14 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 10 $W
part32 m_8b_budget14    14 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 14 $W
part32 m_8b_budget20    14 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 20 $W
part32 m_8b_budget24    14 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 24 $W
part32 p_make_wait       5 120 peer_make_wait 8b
part32 u_8b_bs2         85 300 peer_run 8b --framework unsloth --bs 2 --seq 2048
part32 u_8b_bs2_gcoff   70 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part33 pcie            8  60 pcie_probe
part33 p_make_bg         1  10 peer_make_bg 8b 1b
part33 p_make_wait      30 120 peer_make_wait 8b 1b
part33 w_u_8b_32k      100 200 peer_run 8b --framework unsloth --bs 1 --seq 32768 --warmup 0 --steps 1
part33 w_u_8b_bs2       70 150 peer_run 8b --framework unsloth --bs 2 --seq 2048 --warmup 0 --steps 1
part33 w_u_8b_bs2_gcoff 55 150 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off --warmup 0 --steps 1
part33 w_u_1b_bs2       55 150 peer_run 1b --framework unsloth --bs 2 --seq 2048 --warmup 0 --steps 1
part33 w_u_1b_bs2_gcoff 45 150 peer_run 1b --framework unsloth --bs 2 --seq 2048 --gc off --warmup 0 --steps 1
part33 w_u_1b_bs8       80 150 peer_run 1b --framework unsloth --bs 8 --seq 2048 --warmup 0 --steps 1
part33 w_h_8b_bs2       30 120 peer_run 8b --framework hf --bs 2 --seq 2048 --warmup 0 --steps 1
part33 w_h_1b_bs2       20 120 peer_run 1b --framework hf --bs 2 --seq 2048 --warmup 0 --steps 1
part34 gputests         25  60 python3 -m pytest -q -p no:cacheprovider tests/test_memory_policy.py -k default_budget
part34 m_8b_360k_h100  330 540 $B --preset llama-3.1-8b --batch_size 1 --seq_len 360448 --gc auto --mlp_chunk 8192 --gpu_memory_gb 79.1 --warmup 0 --steps 1
part35 p_make_bg         1  10 peer_make_bg 8b
part35 m_8b_32k_cap14   60 240 $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 --gpu_memory_gb 14 $W
part35 m_8b_budget10    14 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 10 $W
part35 m_8b_budget14    14 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 14 $W
part35 m_8b_budget20    14 240 $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 20 $W
part35 p_make_wait       5 120 peer_make_wait 8b
part35 u_8b_bs2         85 300 peer_run 8b --framework unsloth --bs 2 --seq 2048
part35 u_8b_bs2_gcoff   70 300 peer_run 8b --framework unsloth --bs 2 --seq 2048 --gc off
part35 gputests         70 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_checkpointing.py tests/test_memory_policy.py -k "cuda or graph"
part36 m_8b_32k_cap14_exp 60 240 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 14 --gpu_memory_gb 14 $W
part36 m_8b_32k_cap14_b13 60 240 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False $B --preset llama-3.1-8b --batch_size 1 --seq_len 32768 --gc auto --max_memory_gb 13 --gpu_memory_gb 14 $W
part36 m_8b_cap7_exp     15 240 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto --max_memory_gb 7 --gpu_memory_gb 7 $W
part36 m_8b_bs2          15 240 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part36 m_8b_bs2_exp      15 240 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $B --preset llama-3.1-8b --batch_size 2 --seq_len 2048 --gc auto $W
part36 m_1b_bs2          13 180 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part36 m_1b_bs2_exp      13 180 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $B --preset llama-3.2-1b --batch_size 2 --seq_len 2048 --gc auto $W
part37 gputests         20  60 python3 -m pytest -q -p no:cacheprovider tests/test_allocator.py -k cuda
part37 m_8b_360k_h100  330 540 $B --preset llama-3.1-8b --batch_size 1 --seq_len 360448 --gc auto --mlp_chunk 8192 --gpu_memory_gb 79.1 --warmup 0 --steps 1
part4 h_8b_bs2        120 360 peer_run 8b --framework hf --bs 2 --seq 2048
part4 h_1b_bs2         60 300 peer_run 1b --framework hf --bs 2 --seq 2048
part4 m_qwen7b_bs2     40 240 $B --preset qwen2.5-7b --batch_size 2 --seq_len 2048 --gc auto $W
part4 m_gemma9b_bs2    50 240 $B --preset gemma-2-9b --batch_size 2 --seq_len 2048 --gc auto $W
part4 m_mistral7b_bs2  40 240 $B --preset mistral-7b --batch_size 2 --seq_len 2048 --gc auto $W
part4 m_8b_128k       240 400 $B --preset llama-3.1-8b --batch_size 1 --seq_len 131072 --gc auto --warmup 1 --steps 1
part4 u_8b_64k        150 300 peer_run 8b --framework unsloth --bs 1 --seq 65536 --warmup 1 --steps 2
EOF
}

# --- helpers the jobs call (exported: `timeout` runs them in a fresh bash) -------------------------------------
peer_make() {  # peers_gpu.py's random HF checkpoint of --size $1 in /tmp/peers_$1, kept while the machine is warm
    local dir=/tmp/peers_$1
    [ -f "$dir/config.json" ] && { echo "have $dir"; return 0; }
    rm -rf "$dir.tmp" && python3 .peers/peers_gpu.py make --size "$1" --out "$dir.tmp" && mv "$dir.tmp" "$dir"
}
peer_run() {  # peer_run SIZE ARGS...: peers_gpu.py run on /tmp/peers_SIZE (made first if missing)
    local size=$1; shift
    peer_make "$size" >/dev/null || return 1
    python3 .peers/peers_gpu.py run --model "/tmp/peers_$size" $W "$@"
}
peer_make_bg() {  # peer_make_bg [SIZE...]: peer checkpoints (default 8b 1b) made in the background (disk, CPU)
    local sizes=${*:-8b 1b}
    nohup bash -c "for s in $sizes; do peer_make \$s || exit 1; done" > /tmp/peer_make_bg.log 2>&1 &
    echo "making $sizes in /tmp/peers_<size> in the background (pid $!)"
}
peer_make_wait() {  # peer_make_wait [SIZE...]: until peer_make_bg has made them (default 8b 1b)
    local i s missing
    for i in $(seq 110); do
        missing=0
        for s in ${*:-8b 1b}; do [ -f "/tmp/peers_$s/config.json" ] || missing=1; done
        ((missing)) || { cat /tmp/peer_make_bg.log; return 0; }
        sleep 1
    done
    cat /tmp/peer_make_bg.log; return 1
}
load_8b() {  # issue 3: peak GPU memory while loading the 8B shape in 4 bits, against its final footprint
    local dir=/tmp/minilora_8b
    [ -f "$dir/config.json" ] || python3 scripts/bench_load.py --make "$dir" --make_shape llama-3.1-8b || return 1
    python3 scripts/bench_load.py --load "$dir" --device cuda --load_in_4bit --dtype bfloat16
    local rc=$?
    rm -rf "$dir"  # 16 GB of disk
    return $rc
}
pcie_probe() {  # pinned host<->GPU copy rates, one way and both at once: the 7 GB plan offloads ~0.84 GiB a step
    python3 - <<'PY'
import time, torch
n = 512 << 20
h, h2 = (torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2))
d, d2 = (torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(2))
s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
def rate(copies):
    for _ in range(2):
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(8):
            for stream, dst, src in copies:
                with torch.cuda.stream(stream): dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
    return 8 * n * len(copies) / (time.perf_counter() - t) / 1e9
print(f"h2d {rate([(s1, d, h)]):.1f} GB/s, d2h {rate([(s1, h, d)]):.1f} GB/s, "
      f"both at once {rate([(s1, d, h), (s2, h2, d2)]):.1f} GB/s in all")
PY
}
smi_on() {  # sample the SM clock, power and throttle reasons every 100 ms into $OUT/smi.csv until smi_off
    nohup nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
        --format=csv,noheader,nounits -lms 100 > "$OUT/smi.csv" 2>&1 &
    echo "sampling (pid $!) into $OUT/smi.csv"
}
smi_off() {  # stop smi_on; the clock and power while the GPU was busy (power above 200 W)
    pkill -f "nvidia-smi --query-gpu=timestamp" || true
    python3 - "$OUT/smi.csv" <<'PY'
import statistics, sys
rows = [l.split(", ") for l in open(sys.argv[1]) if l.count(",") >= 4]
busy = [(float(r[1]), float(r[2]), r[4].strip()) for r in rows if r[2].replace(".", "").isdigit() and float(r[2]) > 200]
if busy:
    clocks, watts = [b[0] for b in busy], [b[1] for b in busy]
    reasons = {}
    for b in busy:
        reasons[b[2]] = reasons.get(b[2], 0) + 1
    print(f"{len(busy)} busy samples of {len(rows)}: SM clock min {min(clocks):.0f} median {statistics.median(clocks):.0f} "
          f"max {max(clocks):.0f} MHz; power median {statistics.median(watts):.0f} max {max(watts):.0f} W; "
          f"throttle reasons (bitmask: samples) {reasons}")
else:
    print(f"no busy samples in {len(rows)} rows")
PY
}
export -f peer_make peer_run peer_make_bg peer_make_wait load_8b smi_on smi_off pcie_probe

setup() {  # peers' wheels on PYTHONPATH; minilora importable as minilora.kernels / minilora.models
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if [ "$PART" != part0 ] && [ ! -f /tmp/site/.installed ]; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .peers/whl/*.whl \
            && touch /tmp/site/.installed || echo "WARNING: peer wheels did not install (peers jobs will fail)"
    fi
    if ! (cd /tmp && python3 -c "import minilora.kernels.nf4, minilora.models.llama" 2>/dev/null); then
        # --no-build-isolation: the box has no index to fetch setuptools from (a plain -e . did not work)
        python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
    fi
    if ! (cd /tmp && python3 -c "import minilora.kernels.nf4, minilora.models.llama" 2>/dev/null); then
        echo "editable install did not give minilora.kernels; linking the package tree as pyproject.toml maps it"
        rm -rf /tmp/mlsite && mkdir -p /tmp/mlsite/minilora
        for f in "$PWD"/minilora/*; do ln -s "$f" /tmp/mlsite/minilora/; done
        ln -s "$PWD/kernels" /tmp/mlsite/minilora/kernels && ln -s "$PWD/models" /tmp/mlsite/minilora/models
        export PYTHONPATH=/tmp/mlsite:$PYTHONPATH
    fi
    (cd /tmp && python3 - <<'EOF'
import torch, triton, minilora.kernels.nf4
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print(f"{p.name + f', {p.total_memory / 2**30:.1f} GiB' if p else 'no CUDA'}; torch {torch.__version__}, "
      f"triton {triton.__version__}, CUDA {torch.version.cuda}; minilora from {minilora.kernels.nf4.__file__}")
EOF
    ) | tee "$LOG/env.txt"
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm,power.limit --format=csv >> "$LOG/env.txt" 2>&1
}

run_job() {  # run_job NAME EXPECT CAP COMMAND...
    local name=$1 expect=$2 cap=$3; shift 3
    local now left
    now=$(date +%s); left=$((DEADLINE - now))
    if ((expect > left)); then
        printf '%s\tskipped\t0\t%s\n' "$name" "no time left ($left s < expected $expect s)" >> "$LOG/jobs.tsv"
        echo "[skip] $name: $left s left, expects $expect s"
        return
    fi
    ((cap > left)) && cap=$left
    echo "[$(date +%T)] $name (cap ${cap}s): $*"
    local t0=$SECONDS rc
    timeout -k 20 "$cap" bash -c "$*" < /dev/null > "$LOG/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >> "$LOG/jobs.tsv"
    grep -h '^RESULT ' "$LOG/$name.log" | cut -c1-300
    ((rc == 0)) || { echo "  exit $rc; last lines:"; tail -n 4 "$LOG/$name.log" | cut -c1-300; }
}

summary() {  # summary DIR: one table of every RESULT line in DIR's logs, then the benchmark tables
    # run from /tmp: in the repo root, ./minilora (the source folder) would shadow the installed package
    local dir
    dir=$(cd "$1" && pwd) || return 1
    (cd /tmp && python3 - "$dir" "$OLDPWD/scripts") <<'EOF'
import json, re, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from bench import preset_config, train_flops

log = Path(sys.argv[1])
rows, other = [], []
for f in sorted(log.glob("*.log"), key=lambda p: p.stat().st_mtime):
    for line in f.read_text(errors="replace").splitlines():
        if line.startswith("RESULT "):
            (rows if '"framework"' in line else other).append((f.stem, json.loads(line[7:])))


def mfu(job, r):
    """The FLOP model of scripts/bench.py for a peer row: Unsloth's default and HF's `on` checkpoint every layer."""
    if r.get("mfu") is not None:
        return r["mfu"]
    size = re.search(r"_(1b|8b)_", job + "_")
    if not (size and r.get("ok")):
        return None
    cfg = preset_config(size.group(1))
    modes = ["off" if r.get("gc") == "off" else "offload"] * cfg.num_hidden_layers
    return train_flops(cfg, r["bs"], r["seq"], modes, r.get("r", 16)) / r["step_s"] / 989e12


def f(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


print(f"\n{'job':<18} {'framework':<9} {'bs x seq':<10} {'gc / modes':<26} {'tok/s':>8} {'peak GiB':>8} "
      f"{'reserved':>8} {'MFU':>6} {'loss first>last':>16}  note")
for job, r in rows:
    gc = r.get("modes") or r.get("gc") or "default"
    if r.get("max_memory_gb"):
        gc = f"{gc} <= {r['max_memory_gb']}"
    note = "" if r.get("ok") else r.get("error", "")[:120]
    if r.get("kernels", "1") != "1":
        note = f"MINILORA_TRITON={r['kernels']} " + note
    if r.get("sdpa", "torch") != "torch":
        note = f"MINILORA_SDPA={r['sdpa']} " + note
    if r.get("keep_attention"):
        note = "attention kept " + note
    if r.get("alloc_conf", "expandable_segments:True") != "expandable_segments:True":
        note = f"alloc {r['alloc_conf']} " + note
    if r.get("cuda_graphs"):
        note = "graphs " + note
    if r.get("predicted_peak_gb"):
        note = f"predicted {r['predicted_peak_gb']:.2f} " + note
    loss = f"{f(r.get('first_loss'), '.3f')}>{f(r.get('last_loss'), '.3f')}"
    print(f"{job:<18} {r['framework']:<9} {str(r['bs']) + 'x' + str(r['seq']):<10} {gc:<26} "
          f"{f(r.get('tok_s'), ',.0f'):>8} {f(r.get('peak_alloc_gb'), '.2f'):>8} {f(r.get('peak_reserved_gb'), '.2f'):>8} "
          f"{f(mfu(job, r), '.1%'):>6} {loss:>16}  {note}")
for job, r in other:
    print(f"{job}: {json.dumps(r)}")
for name in ("dequant", "memory"):
    p = log / f"{name}.log"
    if p.exists():
        print(f"\n--- {name} (tail) ---")
        print("\n".join(p.read_text(errors="replace").splitlines()[-14:]))
jobs = log / "jobs.tsv"
if jobs.exists():
    print("\n--- jobs (name, exit code, seconds) ---")
    for line in jobs.read_text().splitlines():
        name, rc, secs, what = line.split("\t", 3)
        print(f"{name:<18} {rc:>7} {secs:>5}s" + (f"  {what}" if rc == "skipped" else ""))
EOF
}

case "$PART" in
    list) jobs; exit 0 ;;
    summary) summary "${1:?summary DIR}"; exit 0 ;;
    part0) export DEADLINE_S=120; DEADLINE=$((START + 120)) ;;&
    run)
        # Each job is PART:NAME, or a plain NAME that only one part has (gputests and others repeat across parts).
        [ $# -gt 0 ] || { echo "run PART:NAME..."; exit 2; }
        WANT=" "
        for n in "$@"; do
            if [[ "$n" == *:* ]]; then p=${n%%:*}; n=${n#*:}; else p=""; fi
            hits=$(jobs | awk -v p="$p" -v n="$n" '$2 == n && (p == "" || $1 == p) {print $1}')
            [ -n "$hits" ] || { echo "no job $p${p:+:}$n (see: list)"; exit 2; }
            [ "$(wc -l <<< "$hits")" -eq 1 ] || { echo "job $n is in parts $(echo $hits); name one: PART:$n"; exit 2; }
            WANT+="$hits:$n "
        done ;;
    *)  # a part is any name in the job table's first column
        jobs | awk -v p="$PART" '$1 == p {f = 1} END {exit !f}' || { echo "unknown part $PART; see: bash $0"; exit 2; }
        WANT="" ;;
esac
LOG=$OUT/$PART
mkdir -p "$LOG"
setup
while read -r part name expect cap cmd; do
    if [ -n "$WANT" ]; then [[ "$WANT" == *" $part:$name "* ]] || continue
    else [ "$part" = "$PART" ] || continue; fi
    [ -e "$LOG/$name.log" ] && name="${part}_$name"  # `run` of two parts' gputests: keep both logs
    run_job "$name" "$expect" "$cap" "$cmd"
done < <(jobs)
summary "$LOG" | tee "$LOG/summary.txt"
echo "total $(($(date +%s) - START)) s; logs in $LOG"
