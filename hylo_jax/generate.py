"""Command line: generate text from a prompt with a teacher or a hylo_jax student.

  python -m hylo_jax.generate --config.prompt="Why is the sky blue?"
  python -m hylo_jax.generate --config.model=outputs/hylo_smollm2 --config.prompt_file=p.txt
      --config.temperature=0.7 --config.top_p=0.9 --config.seed=1

Config: configs/generate.py (another file with get_config() via --config=path); every
field can be overridden with --config.<field>=<value>; unknown fields are errors. The
model's tokenizer, chat template and EOS/pad ids come from the checkpoint (its
tokenizer files and generation_config.json, or the GGUF metadata). The continuation
streams to stdout; timings go to stderr.
"""

from __future__ import annotations

import logging
import sys
import time

from absl import app, flags

from hylo_jax.config_files import define_config_flag, load_config, run_cli


def run(config) -> dict:
    """Everything the CLI does, callable from Python: -> {"text", "prompt_tokens",
    "new_tokens", "time_to_first_token_s", "decode_tokens_per_s", "wall_s"}."""
    import jax.numpy as jnp

    from hylo_jax.convert.hub import resolve
    from hylo_jax.inference import generate, generation_defaults, load_tokenizer
    from hylo_jax.inference.text import StreamDecoder
    from hylo_jax.loading import load_model

    if bool(config.prompt) == bool(config.prompt_file):
        raise ValueError("give exactly one of --config.prompt=TEXT and --config.prompt_file=PATH")
    prompt = config.prompt
    if config.prompt_file:
        with open(config.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    t0 = time.perf_counter()
    source = resolve(config.model or None)
    tokenizer = load_tokenizer(source.path)
    defaults = generation_defaults(source.path, tokenizer)
    dtype = jnp.dtype(config.dtype)
    model = load_model(source.path, dtype=dtype, progress=False)
    loaded = time.perf_counter()

    printer = StreamDecoder(tokenizer)
    times = []

    def on_block(rows, tokens):
        times.append((time.perf_counter(), tokens.shape[1]))
        if config.stream:
            print(printer.push(tokens[0].tolist()), end="", flush=True)

    out = generate(
        model, prompt, config.max_new_tokens, tokenizer=tokenizer, chat_template=config.chat_template,
        system_prompt=config.system_prompt or None, temperature=config.temperature, top_k=config.top_k,
        top_p=config.top_p, seed=config.seed, eos_token_id=defaults.eos_token_id,
        pad_token_id=defaults.pad_token_id, prefill_chunk_size=config.prefill_chunk_size or None,
        decode_block=config.decode_block, cache_dtype=jnp.dtype(config.cache_dtype) if config.cache_dtype else None,
        stream=on_block,
    )
    end = time.perf_counter()
    if config.stream:
        print(flush=True)
    else:
        print(out.texts[0], flush=True)
    # The first block is the prefill (and its compile), the second compiles the decode
    # loop: the decode rate is taken over the blocks after those.
    later = times[2:]
    rate = sum(n for _, n in later) / (later[-1][0] - times[1][0]) if later else float("nan")
    return {
        "text": out.texts[0],
        "prompt_tokens": int(len(out.prompt_ids[0])),
        "new_tokens": int(out.num_tokens[0]),
        "load_s": loaded - t0,
        "time_to_first_token_s": times[0][0] - loaded,
        "decode_tokens_per_s": rate,
        "wall_s": end - t0,
    }


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    logging.getLogger("jax").setLevel(logging.WARNING)  # not the backend probing at INFO
    try:
        stats = run(_CONFIG.value)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(
        f"[{stats['prompt_tokens']} prompt tokens, {stats['new_tokens']} new; load {stats['load_s']:.1f} s, "
        f"time to first token {stats['time_to_first_token_s']:.1f} s (includes compiling), "
        f"decode {stats['decode_tokens_per_s']:.1f} tokens/s after the first two blocks]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    _CONFIG = define_config_flag(
        "generate", "ml_collections config file (get_config()). Fields and defaults:\n" + str(load_config("generate"))
    )
    flags.declare_key_flag("config")  # --help lists it
    run_cli(main)
