"""Published fit facts and step times for mixture-of-experts fine-tuning (issue 12), each with its source,
its stated setup and the exact quote. Held out of any fit: no ltune constant was set from them. No test
runs the planner here (the MoE planner does not exist yet); the lead writes the test against these.

metric:
- "fits": the run fits on that many GPUs of that size (an upper bound on ltune's per-GPU total);
- "oom": the run does not fit (ltune's per-GPU total should exceed the GPU);
- "peak_gib": per-GPU memory the source reports (nvidia-smi style unless `notes` says otherwise);
- "step_s": seconds per optimizer step (global batch in `global_batch`);
- "tokens_per_s_per_gpu": derived from step_s (the derivation is in `notes`).

`modelled_by_ltune` is False where the run relies on what ltune's DeepSpeed planner does not model at all
(Megatron tensor/expert/pipeline parallelism, device_map model parallelism): keep those rows as
documentation or as xfail, not as pass/fail checks. See /work/notes/published_moe.md.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class PublishedMoE:
    """One published MoE fine-tuning fact and the run it came from."""

    name: str
    model: str  # ltune profile name the lead is adding (issue 12)
    method: str  # full | lora | qlora
    seq_len: int  # tokens per sample as run (packed length where packing is on)
    micro_batch: int  # samples per GPU per forward
    num_gpus: int
    gpu: str  # ltune GPU profile name (or the closest)
    hbm_gib: float  # memory of one GPU
    zero_stage: int | None  # DeepSpeed ZeRO stage; None where the run does not use DeepSpeed
    framework: str  # deepspeed | megatron | device_map | ddp
    offload: str  # none | optimizer
    recompute: str  # full | none
    metric: str  # fits | oom | peak_gib | step_s | tokens_per_s_per_gpu
    value: float  # GPUs for "fits"/"oom" (=num_gpus), GiB, seconds or tokens/s
    source: str  # URL (file and commit where the index named one)
    quote: str  # the sentence(s) giving the number and the setup
    notes: str = ""  # assumptions and what the run does that ltune may not model
    packed: bool = False
    global_batch: int | None = None
    precision: str = "bf16"  # bf16 | fp16 (AMP) | nf4+fp16 (QLoRA)
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = ()
    modelled_by_ltune: bool = True


SWIFT_QWEN3_BP = ("https://github.com/modelscope/ms-swift/blob/main/docs/source_en/BestPractices/"
                  "Qwen3-Best-Practice.md")
SWIFT_QUICKSTART = ("https://github.com/modelscope/ms-swift/blob/001320d09193522edf9f937d4af192e83c520e56/"
                    "docs/source_en/Megatron-SWIFT/Quick-start.md")
SWIFT_QWEN3_QUOTE = (
    "The training speed comparison for full-parameter MoE models with 8K context length, using `megatron sft` "
    "and `swift sft`, under a two-node, 16-GPU A800 environment is as follows: **MoE** Qwen3-30B-A3B: | "
    "Training Speed | 9.6s/it | - | 91.2s/it | GPU Memory Usage | 16 * 60GiB | OOM | 16 * 80GiB |"
    " (columns Megatron-LM | Deepspeed-ZeRO2 | Deepspeed-ZeRO3)")
XTUNER_README_16 = "https://github.com/InternLM/xtuner/blob/main/xtuner/configs/mixtral/README.md"
XTUNER_FULL_CFG = ("https://github.com/InternLM/xtuner/blob/03c277872a99780ab2386d2e78f55ea70e06a92f/"
                   "xtuner/configs/mixtral/mixtral_8x7b/mixtral_8x7b_full_oasst1_e3.py")
XTUNER_QLORA_CFG = ("https://github.com/InternLM/xtuner/blob/36592ef131474bd346a700c63120def02f61e9e5/"
                    "xtuner/configs/mixtral/mixtral_8x7b/mixtral_8x7b_qlora_oasst1_e3.py")
XTUNER_ZERO3 = ("https://github.com/InternLM/xtuner/blob/05525371144c366f172fae163727fe3937be4637/"
                "xtuner/configs/deepspeed/deepspeed_zero3.json")
MIXTRAL_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")

PUBLISHED_MOE: tuple[PublishedMoE, ...] = (
    # ------------------------------------------------------------ ms-swift: Qwen3-30B-A3B full, 16 x A800-80G
    PublishedMoE(
        name="swift qwen3-30b-a3b full zero2 16xA800 8k: OOM",
        model="qwen3-30b-a3b", method="full", seq_len=8192, micro_batch=1, num_gpus=16, gpu="a800-80g",
        hbm_gib=80.0, zero_stage=2, framework="deepspeed", offload="none", recompute="full",
        metric="oom", value=16, source=SWIFT_QUICKSTART, quote=SWIFT_QWEN3_QUOTE, packed=True, global_batch=16,
        notes=("The swift sft (DeepSpeed) command is not printed; setup taken from the Megatron command of the same "
               "comparison in " + SWIFT_QWEN3_BP + " (micro_batch_size 1, global_batch_size 16, packing true, "
               "max_length 8192, full recompute, moe_aux_loss_coeff 0.01) and swift's defaults (gradient "
               "checkpointing on, bf16, AdamW). Hand check: ZeRO-2 keeps bf16 weights unsharded: 30.5e9 x 2 B = "
               "57 GiB + (2+12) B x 30.5e9 / 16 = 25 GiB sharded grads+states = 82 GiB > 80 before activations.")),
    PublishedMoE(
        name="swift qwen3-30b-a3b full zero3 16xA800 8k: fits at 80 GiB",
        model="qwen3-30b-a3b", method="full", seq_len=8192, micro_batch=1, num_gpus=16, gpu="a800-80g",
        hbm_gib=80.0, zero_stage=3, framework="deepspeed", offload="none", recompute="full",
        metric="fits", value=16, source=SWIFT_QUICKSTART, quote=SWIFT_QWEN3_QUOTE, packed=True, global_batch=16,
        notes=("Same assumptions as the ZeRO-2 row. '16 * 80GiB' is the reported usage, i.e. the whole card "
               "(nvidia-smi, caching allocator reserve included): a fit with no headroom, not a peak allocation. "
               "Model states alone: 16 B x 30.5e9 / 16 = 28.4 GiB per GPU.")),
    PublishedMoE(
        name="swift qwen3-30b-a3b full zero3 16xA800 8k: 91.2 s/it",
        model="qwen3-30b-a3b", method="full", seq_len=8192, micro_batch=1, num_gpus=16, gpu="a800-80g",
        hbm_gib=80.0, zero_stage=3, framework="deepspeed", offload="none", recompute="full",
        metric="step_s", value=91.2, source=SWIFT_QUICKSTART, quote=SWIFT_QWEN3_QUOTE, packed=True,
        global_batch=16,
        notes=("If global batch = 16 packed 8192-token samples (assumed, as the Megatron run): 131,072 tokens / "
               "91.2 s / 16 GPUs = 89.8 tokens/s/GPU = 6 x 3.3e9 x 89.8 = 1.8 TFLOP/s/GPU of 312 peak (0.6% MFU): "
               "the transformers MoE block of that time looped over 128 experts per layer (small GEMMs, "
               "per-expert ZeRO-3 gathers, 2 nodes). ltune's compute-bound step time will be far too short "
               "unless it models per-expert launch/gather overhead; the communication term (all 30.5B params "
               "gathered twice + reduce-scattered per step over 2 nodes) is the right order only if the "
               "inter-node bandwidth is modelled.")),
    PublishedMoE(
        name="swift qwen3-30b-a3b full zero3 16xA800 8k: tokens/s/GPU (derived)",
        model="qwen3-30b-a3b", method="full", seq_len=8192, micro_batch=1, num_gpus=16, gpu="a800-80g",
        hbm_gib=80.0, zero_stage=3, framework="deepspeed", offload="none", recompute="full",
        metric="tokens_per_s_per_gpu", value=16 * 8192 / 91.2 / 16, source=SWIFT_QUICKSTART,
        quote=SWIFT_QWEN3_QUOTE, packed=True, global_batch=16,
        notes="Derived: 16 x 8192 tokens / 91.2 s / 16 GPUs; the global batch of the DeepSpeed run is assumed."),
    PublishedMoE(
        name="swift qwen3-30b-a3b full megatron tp2 ep8 16xA800 8k: 60 GiB",
        model="qwen3-30b-a3b", method="full", seq_len=8192, micro_batch=1, num_gpus=16, gpu="a800-80g",
        hbm_gib=80.0, zero_stage=None, framework="megatron", offload="none", recompute="full",
        metric="peak_gib", value=60.0, source=SWIFT_QWEN3_BP,
        quote=("megatron sft --load Qwen3-30B-A3B-Base-mcore ... --tensor_model_parallel_size 2 "
               "--expert_model_parallel_size 8 --moe_grouped_gemm true --moe_shared_expert_overlap true "
               "--moe_aux_loss_coeff 0.01 --micro_batch_size 1 --global_batch_size 16 --packing true "
               "--recompute_granularity full --recompute_method uniform --recompute_num_layers 1 ... "
               "--max_length 8192 ... --sequence_parallel true --use_flash_attn true | Training Speed | 9.6s/it "
               "| GPU Memory Usage | 16 * 60GiB"),
        packed=True, global_batch=16, modelled_by_ltune=False,
        notes=("Megatron TP2 x EP8 x DP8 with ZeRO-1-style distributed optimizer, grouped GEMM; "
               "2 nodes x 8 A800-80G. 9.6 s/it -> 131,072 / 9.6 / 16 = 853 tokens/s/GPU. ltune has no TP/EP.")),
    # ------------------------------------------------------------ XTuner: Mixtral-8x7B
    PublishedMoE(
        name="xtuner mixtral-8x7b full zero3 16xA100-80G 2k packed: fits",
        model="mixtral-8x7b", method="full", seq_len=2048, micro_batch=1, num_gpus=16, gpu="a100-80g",
        hbm_gib=80.0, zero_stage=3, framework="deepspeed", offload="none", recompute="full",
        metric="fits", value=16, source=XTUNER_README_16,
        quote=("Full parameter fine-tune needs 16 A100-80G ... xtuner train mixtral_8x7b_instruct_full_oasst1_e3 "
               "--deepspeed deepspeed_zero3 --launcher slurm  [config: max_length = 2048, pack_to_max_length = "
               "True, batch_size = 1  # per_device, accumulative_counts = 16, optim AdamW, AmpOptimWrapper "
               "dtype='float16']"),
        packed=True, global_batch=256, precision="fp16",
        notes=("Config: " + XTUNER_FULL_CFG + "; DeepSpeed json " + XTUNER_ZERO3 + " (stage 3, no offload, "
               "fp16 enabled, allgather/reduce buckets 3e8). Activation checkpointing: xtuner SupervisedFinetune "
               "defaults use_activation_checkpointing=True. Maintainer in InternLM/xtuner PR #275: "
               "'全量微调最新测出来只要 16*80G 就够了' (latest measurement: 16 x 80G is enough for full fine-tuning); "
               "an earlier README said 32 A100-80G. Model states 16 B x 46.7e9 / 16 = 43.5 GiB per GPU. "
               "Upper bound only: fewer GPUs were not reported as failing.")),
    PublishedMoE(
        name="xtuner mixtral-8x7b qlora 1xA100-80G 2k packed: fits",
        model="mixtral-8x7b", method="qlora", seq_len=2048, micro_batch=1, num_gpus=1, gpu="a100-80g",
        hbm_gib=80.0, zero_stage=2, framework="deepspeed", offload="none", recompute="full",
        metric="fits", value=1, source=XTUNER_README_16,
        quote=("QLoRA only need a single A100-80G  xtuner train mixtral_8x7b_instruct_qlora_oasst1_e3 "
               "--deepspeed deepspeed_zero2  [config: max_length = 2048, pack_to_max_length = True, batch_size = 1, "
               "LoraConfig r=64, lora_alpha=16, lora_dropout=0.1, target_modules=['q_proj','k_proj','v_proj',"
               "'o_proj','w1','w2','w3'], BitsAndBytesConfig load_in_4bit, nf4, double quant, compute fp16]"),
        packed=True, precision="nf4+fp16", lora_rank=64, lora_targets=MIXTRAL_ALL_LINEAR,
        notes=("Config: " + XTUNER_QLORA_CFG + ". LoRA on every expert's w1/w2/w3: r x (in+out) per linear = 64 x 32 "
               "layers x (q 8192 + k 5120 + v 5120 + o 8192 + 8 experts x 3 x (4096+14336)) = 960.5M adapter params; "
               "nf4 base ~ 24 GiB. Peak not reported (upper bound 80 GiB).")),
    # ------------------------------------------------------------ ms-swift (v1 scripts): Mixtral LoRA, 2 x A100
    PublishedMoE(
        name="swift mixtral-8x7b-instruct lora r8 qkvo 2xA100 device_map: 60 GB each",
        model="mixtral-8x7b", method="lora", seq_len=2048, micro_batch=1, num_gpus=2, gpu="a100-80g",
        hbm_gib=80.0, zero_stage=None, framework="device_map", offload="none", recompute="none",
        metric="peak_gib", value=60.0,
        source=("https://github.com/modelscope/ms-swift/blob/5ab2a9f51319c30cc8ea629b6bb59718b6d08435/"
                "examples/pytorch/llm/scripts/mixtral_moe_7b_instruct/lora/sft.sh"),
        quote=("# Experimental environment: 2 * A100\n# 2 * 60GB GPU memory\nCUDA_VISIBLE_DEVICES=0,1 python "
               "llm_sft.py --model_id_or_path AI-ModelScope/Mixtral-8x7B-Instruct-v0.1 --sft_type lora "
               "--dtype AUTO --max_length 2048 --lora_rank 8 --lora_alpha 32 --lora_dropout_p 0.05 "
               "--lora_target_modules q_proj k_proj v_proj o_proj --gradient_checkpointing false --batch_size 1 "
               "--gradient_accumulation_steps 16 --use_flash_attn true"),
        precision="bf16", lora_rank=8, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        modelled_by_ltune=False,
        notes=("One process, model split over the 2 GPUs by device_map (naive layer-wise model parallel, no DDP, "
               "no DeepSpeed): each GPU holds ~half the bf16 weights (87 GiB / 2 = 43.5 GiB) + its layers' "
               "activations without checkpointing. max_length 2048 is a cap (dureader-robust-zh samples are "
               "shorter, not packed), '60GB' unit (GB vs GiB) and statistic (nvidia-smi) unstated.")),
    # ------------------------------------------------------------ ms-swift Megatron LoRA: Qwen3-235B-A22B
    PublishedMoE(
        name="swift qwen3-235b-a22b lora r8 all-linear megatron ep8 8xGPU 2k: 90 GiB, 3.5 s/it",
        model="qwen3-235b-a22b", method="lora", seq_len=2048, micro_batch=2, num_gpus=8, gpu="h20",
        hbm_gib=96.0, zero_stage=None, framework="megatron", offload="none", recompute="full",
        metric="peak_gib", value=90.0,
        source=("https://github.com/modelscope/ms-swift/blob/3fcac31090f3ddce64adcc1dc79ccee3435f1cfd/"
                "examples/train/megatron/lora/qwen3_235b.sh"),
        quote=("# 8 * 90GiB, 3.5s/it ... megatron sft --load Qwen3-235B-A22B-Instruct-2507-mcore --train_type lora "
               "--lora_rank 8 --lora_alpha 32 --target_modules all-linear --expert_model_parallel_size 8 "
               "--moe_grouped_gemm true --micro_batch_size 2 --global_batch_size 16 --recompute_granularity full "
               "--recompute_method uniform --recompute_num_layers 1 --max_length 2048 --sequence_parallel true"),
        global_batch=16, lora_rank=8, lora_targets=("all-linear",), modelled_by_ltune=False,
        notes=("GPU type not in the script; ms-swift docs (Qwen3 best practice, PR #5033) say this was '单机8卡H20' "
               "(one node, 8 x H20 96 GB). EP8: each GPU holds 16 of 128 experts (235e9 x 2 B / 8 ~ 55 GiB of "
               "expert+replicated weights). Not packed: 2048 is a cap.")),
    PublishedMoE(
        name="swift qwen3-235b-a22b lora r8 megatron ep2 pp4 8x80GiB cpu-optimizer: 78 GiB, 9.5 s/it",
        model="qwen3-235b-a22b", method="lora", seq_len=2048, micro_batch=8, num_gpus=8, gpu="a100-80g",
        hbm_gib=80.0, zero_stage=None, framework="megatron", offload="optimizer", recompute="full",
        metric="peak_gib", value=78.0,
        source=("https://github.com/modelscope/ms-swift/blob/3fcac31090f3ddce64adcc1dc79ccee3435f1cfd/"
                "examples/train/megatron/lora/qwen3_235b.sh"),
        quote=("# If you need to run with 8 GPUs each with 80GiB of memory, you can use the following configuration:"
               "\n# 8 * 78GiB; 9.5s/it ... --expert_model_parallel_size 2 --pipeline_model_parallel_size 4 "
               "--micro_batch_size 8 --global_batch_size 16 --recompute_granularity full --max_length 2048 "
               "--optimizer_cpu_offload true --use_precision_aware_optimizer true"),
        global_batch=16, lora_rank=8, lora_targets=("all-linear",), modelled_by_ltune=False,
        notes="80 GiB card type unstated (A100/H800 class). Megatron EP2 x PP4; adapters' optimizer on CPU."),
    # ------------------------------------------------------------ LLaMA-Factory issue: DDP without ZeRO OOMs
    PublishedMoE(
        name="llamafactory mixtral-8x7b lora q,v 8xA800 plain DDP: OOM",
        model="mixtral-8x7b", method="lora", seq_len=1024, micro_batch=2, num_gpus=8, gpu="a800-80g",
        hbm_gib=80.0, zero_stage=0, framework="ddp", offload="none", recompute="full", metric="oom", value=8,
        source="https://github.com/hiyouga/LlamaFactory/issues/2379",
        quote=("Mixtral-8x7b 单机8卡，8xA800，LoRA不成功，出现OOM ... accelerate launch ... --finetuning_type lora "
               "--lora_target q_proj,v_proj --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --fp16 "
               "[accelerate: distributed_type: MULTI_GPU, num_processes: 8] -- hiyouga: 需要使用 Deepspeed 命令启动，"
               "并且开启 ZeRO3 模式 (must launch with DeepSpeed and enable ZeRO-3)"),
        precision="fp16", lora_targets=("q_proj", "v_proj"),
        notes=("seq_len 1024 = LLaMA-Factory's cutoff_len default of that time (not in the command; assumption); "
               "checkpointing on by LLaMA-Factory default then (assumption). The OOM does not depend on either: "
               "every DDP rank holds the full fp16 model, 46.7e9 x 2 B = 87 GiB > 80 GiB.")),
)
