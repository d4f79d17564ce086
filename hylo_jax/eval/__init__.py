"""Evaluation: RULER-style long-context tasks over real text (`tasks`, `prompts`,
`passkey`), loss by position (`long_loss`), held-out perplexity (`perplexity`), the
local corpora (`corpus`), and the suite that runs them side by side (`suite`,
`python -m hylo_jax.eval`)."""
