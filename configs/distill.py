"""Base config for `python -m hylo_jax.distill` (staged teacher -> hybrid distillation).

Override any field on the command line, e.g.
  python -m hylo_jax.distill --config=configs/distill.py --config.workdir=/tmp/run \
      --config.stages.kl.steps=200 --config.mesh.fsdp=8
Variants (e.g. configs/distill_smollm2_gpu.py) import this file and change only what
differs. Stages run in `stage_order`; each names an entry of `stages`.
"""

import ml_collections

from hylo_jax.distill import data


def stage(kind, seq_len, steps, batch_size, lr, *, warmup_fraction=0.01, remat="none", temperature=1.0,
          ce_weight=0.0, kl_chunk=512, yarn_factor=0.0, yarn_original_max_position=0):
    s = ml_collections.ConfigDict()
    s.kind = kind  # "align" (stage 1: per-layer alignment) | "kl" (end-to-end KL)
    s.seq_len = seq_len
    s.steps = steps
    s.batch_size = batch_size  # global, over all devices and hosts
    s.lr = lr  # peak; linear warmup, then cosine to optimizer.min_lr_ratio * lr
    s.warmup_fraction = warmup_fraction
    s.remat = remat  # "none" | "full" | "dots" (per decoder layer)
    s.temperature = temperature  # KL temperature (loss scaled by T^2)
    s.ce_weight = ce_weight  # loss = (1 - w) * KL + w * next-token CE
    s.kl_chunk = kl_chunk  # sequence chunk for the KL (logits [B, chunk, V] at a time)
    # RoPE scaling of the MLA layers from this stage on (rope_type "" = unchanged).
    s.mla_rope_scaling = ml_collections.ConfigDict()
    s.mla_rope_scaling.rope_type = "yarn" if yarn_factor else ""
    s.mla_rope_scaling.factor = float(yarn_factor)
    s.mla_rope_scaling.original_max_position_embeddings = int(yarn_original_max_position)
    return s


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    # Teacher: HF dir | .gguf | hub id | hylo_jax dir; "" = bundled SmolLM2-135M GGUF.
    cfg.teacher = ""
    # Student: a hylo_jax checkpoint dir, e.g. the hybrid written by
    # `python -m hylo_jax.convert --config.student...` (required).
    cfg.student = ""
    cfg.workdir = "outputs/distill"
    cfg.export_dir = ""  # if set, the distilled student is exported there (HF-style dir)
    cfg.seed = 0
    cfg.dtype = "float32"  # compute dtype
    cfg.param_dtype = "float32"  # storage dtype of the student (and optimizer moments)

    cfg.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})  # -1: all remaining devices
    cfg.assert_sharded = True
    # Multi-host: coordinator "host:port" (or auto=True on managed clusters); "" = one process.
    cfg.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 1, "process_id": 0, "auto": False, "timeout_s": 300}
    )

    # Data: on the training machine, `python -m hylo_jax.distill.prepare --config=<this file>
    # --config.data.prepare.out_dir=DIR` writes token shards; then data.kind="tokens",
    # data.path=DIR, and data.mixture="source:weight,..." per stage (long_code / long_docs
    # for the long-context stage). The default reads the local corpora on the fly.
    cfg.data = data.default_config()

    cfg.optimizer = ml_collections.ConfigDict(
        {"b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.01, "clip_norm": 1.0, "min_lr_ratio": 0.1}
    )

    # The HyLo recipe at laptop scale: stage 1 alignment at 2K (lr 2e-4), end-to-end KL
    # (lr 6e-5, 1 % warmup), then a long-context KL stage with YaRN on the MLA layers.
    cfg.stages = ml_collections.ConfigDict()
    cfg.stages.align = stage("align", 2048, 200, 8, 2e-4)
    cfg.stages.kl = stage("kl", 2048, 400, 8, 6e-5)
    cfg.stages.long = stage("kl", 8192, 100, 2, 6e-5, remat="full", yarn_factor=4.0, yarn_original_max_position=2048)
    cfg.stage_order = "align,kl,long"

    cfg.log_every = 10
    cfg.tensorboard = True
    cfg.checkpoint_every = 100
    cfg.checkpoint_keep = 2

    cfg.eval = ml_collections.ConfigDict()
    cfg.eval.enabled = True
    cfg.eval.corpus = "pydoc_topics"  # held-out split of hylo_jax.eval.corpus
    cfg.eval.ppl_seq_len = 1024
    cfg.eval.ppl_windows = 16
    cfg.eval.batch_size = 4
    cfg.eval.passkey_lengths = "1024,4096"  # comma-separated token lengths; "" = none
    cfg.eval.passkey_trials = 10
    cfg.eval.passkey_batch_size = 1  # prompts decoded together
    cfg.eval.passkey_prefill_chunk_size = 2048  # prefill long prompts in chunks (0 = at once)
    cfg.eval.passkey_teacher = True  # at the start
    cfg.eval.passkey_at_init = True  # also the untrained student
    cfg.eval.passkey_every_stage = False  # else: at the start and after the last stage only
    cfg.eval.seed = 0
    return cfg
