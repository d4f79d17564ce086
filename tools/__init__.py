"""Developer tools: the benchmark entry point (`python -m tools.bench`) and the GPU jobs (tools/gpu/)."""
