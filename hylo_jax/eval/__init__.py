"""Evaluation: held-out perplexity on real text (`perplexity`), corpora (`corpus`)."""
