"""The real run on one GPU: SmolLM2-135M-Instruct teacher -> default MLA + GDN hybrid
(from `python -m hylo_jax.convert`), stage 1 alignment, stage 2 KL at 2K, then a
long-context KL stage at 8K (the teacher's trained length) with YaRN x4 on the MLA
layers (aimed at 32K), on CPython stdlib sources (real text on the machine).
Only the differences from configs/distill.py. Run by tools/gpu/distill_smollm2.sh,
which may split it over several calls (a pre-empted run resumes from its checkpoint).
"""

from hylo_jax.config_files import load_module

_base = load_module("distill")


def get_config():
    cfg = _base.get_config()
    cfg.dtype = "bfloat16"  # compute; params and AdamW moments stay float32
    cfg.workdir = "/tmp/hylo_distill"
    cfg.data.name = "python_stdlib"
    cfg.eval.corpus = "python_stdlib"
    # Minutes of a shared GPU budget, not the paper's 10B tokens.
    cfg.stages.align = _base.stage("align", 2048, 300, 8, 5e-4, warmup_fraction=0.05, remat="full")
    cfg.stages.kl = _base.stage("kl", 2048, 1500, 8, 3e-4, warmup_fraction=0.02, remat="full", kl_chunk=1024)
    # The teacher is only trustworthy up to its trained 8K, so the long stage trains at
    # 8K with YaRN x4 on the MLA layers, for use at 32K.
    cfg.stages.long = _base.stage(
        "kl", 8192, 200, 2, 1e-4, remat="full", kl_chunk=1024, yarn_factor=4.0, yarn_original_max_position=8192
    )
    cfg.log_every = 25
    cfg.checkpoint_every = 100
    cfg.checkpoint_keep = 1
    cfg.eval.ppl_seq_len = 2048
    cfg.eval.ppl_windows = 8
    cfg.eval.batch_size = 4
    cfg.eval.passkey_lengths = "1024,4096,16384,32768,65536"
    cfg.eval.passkey_trials = 10
    cfg.eval.passkey_batch_size = 5
    cfg.eval.passkey_prefill_chunk_size = 4096
    cfg.eval.passkey_at_init = False  # off to save device time (BENCHMARKS.md reports no untrained passkey)
    return cfg
