"""Default config for `python -m hylo_jax.eval` (long-context tasks, loss by position
and short-context quality, models side by side).

  python -m hylo_jax.eval --config.models=,outputs/hylo_smollm2 --config.lengths=1024,4096,16384
  python -m hylo_jax.eval --config.tasks=niah_single_number --config.lengths=1024,2048 --config.samples=20
"""

import ml_collections

TASKS = (
    "niah_single_number,niah_single_word,niah_single_uuid,niah_multikey,niah_multivalue,niah_multiquery,"
    "vt,cwe,qa,passkey"
)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Comma-separated checkpoints (HF dir | .gguf | hub id | hylo_jax dir), evaluated side
    # by side on the same samples; an empty entry is the default teacher (SmolLM2-135M-Instruct).
    config.models = ""
    config.labels = ""  # comma-separated names in the results ("" = "teacher" / the directory's name)
    config.tasks = TASKS  # hylo_jax/eval/tasks.py describes each
    config.lengths = "1024,2048,4096"  # prompt lengths in tokens (exact)
    config.samples = 10  # per task and length
    config.seed = 0  # the same seed gives the same samples
    config.output_dir = "outputs/eval"  # results.json, results.md, results.png, samples.jsonl, run.json
    config.batch_size = 4  # samples per compiled batch
    config.prefill_chunk_size = 2048  # prompt tokens per compiled prefill step (0 = whole prompt)
    config.chat_template = True  # task prompts inside the tokenizer's chat template (when it has one)
    # Haystack text: corpora of hylo_jax.eval.corpus, in this split ("heldout" | "train" | "all").
    config.haystack_corpora = "debian_docs,pydoc_topics,python_stdlib"
    config.haystack_split = "heldout"
    config.code_split = "heldout"  # python_stdlib split of the qa task's code
    config.dtype = "float32"
    config.cache_dtype = ""  # "" = dtype

    # Loss by position over long held-out documents (hylo_jax/eval/long_loss.py).
    config.loss_by_position = ml_collections.ConfigDict()
    config.loss_by_position.enabled = True
    config.loss_by_position.corpus = "python_stdlib"
    config.loss_by_position.split = "heldout"
    config.loss_by_position.length = 0  # tokens per document; 0 = the longest of lengths
    config.loss_by_position.samples = 2

    # Short-context quality: held-out perplexity and KL(teacher || model).
    config.short = ml_collections.ConfigDict()
    config.short.enabled = True
    config.short.kl = True
    config.short.corpus = "pydoc_topics"
    config.short.seq_len = 512
    config.short.windows = 8
    config.short.batch_size = 4
    config.teacher = ""  # the teacher of the KL ("" = the default teacher)
    return config
