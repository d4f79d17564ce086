"""The real run on one GPU: SmolLM2-135M-Instruct teacher -> default MLA + GDN hybrid
(from `python -m hylo_jax.convert`), stage 1 alignment, stage 2 KL at 2K, then a 16K
stage with YaRN on the MLA layers, on CPython stdlib sources (real text on the machine).
Only the differences from configs/distill.py. Run by tools/distill_smollm2_gpu.sh.
"""

from hylo_jax.config_files import load_module

_base = load_module("distill")


def get_config():
    cfg = _base.get_config()
    cfg.dtype = "bfloat16"  # compute; params and AdamW moments stay float32
    cfg.workdir = "/tmp/hylo_distill"
    cfg.data.name = "python_stdlib"
    cfg.eval.corpus = "python_stdlib"
    # A few minutes of a shared GPU budget, not the paper's 10B tokens.
    cfg.stages.align = _base.stage("align", 2048, 60, 8, 3e-4, remat="full")
    cfg.stages.kl = _base.stage("kl", 2048, 120, 8, 1e-4, remat="full", kl_chunk=1024)
    cfg.stages.long = _base.stage(
        "kl", 16384, 15, 1, 5e-5, remat="full", kl_chunk=1024, yarn_factor=4.0, yarn_original_max_position=8192
    )
    cfg.log_every = 25
    cfg.checkpoint_every = 10_000  # stage ends only: the device's disk is discarded anyway
    cfg.checkpoint_keep = 1
    cfg.eval.ppl_seq_len = 2048
    cfg.eval.ppl_windows = 8
    cfg.eval.batch_size = 4
    cfg.eval.passkey_lengths = "4096,32768"
    cfg.eval.passkey_trials = 5
    cfg.eval.passkey_prefill_chunk = 4096
    return cfg
